"""The client commands stay light: they import what a connection needs, not what only the
server, ``certs`` and ``plugins`` use (docs/performance.md, "The client's start-up").

Real commands against a real server, with ``python -X importtime`` (its environment
variable, for the installed ``jobworker`` script): every module a command imported is
named on stderr.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.conftest import JOBWORKER, Cli

#: What only the server side needs: about as long to import, together, as grpc itself.
SERVER_ONLY = ("cryptography", "pluggy", "importlib.metadata", "structlog")
#: What starting a job and following its output do without (jobworker.api.codec speaks
#: protobuf by hand): protobuf's runtime, the model, attrs, a third of grpc's import.
MODEL = (
    "google.protobuf",
    "jobworker.v1",
    "jobworker.api.wire",
    "jobworker.model",
    "attr",
    "attrs",
)


def imported(result: subprocess.CompletedProcess[str]) -> set[str]:
    """The modules ``-X importtime`` reported; the command must have succeeded."""
    assert result.returncode == 0, result.stderr
    names = {
        line.rpartition("|")[2].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "jobworker" in names, "no import was reported"
    return names


def server_only(names: set[str], modules: tuple[str, ...] = SERVER_ONLY) -> list[str]:
    """The ``modules`` (packages included) among ``names``."""
    return sorted(n for n in names if any(n == m or n.startswith(f"{m}.") for m in modules))


def traced(cli: Cli, *args: str, stdin: str | None = "") -> subprocess.CompletedProcess[str]:
    """``jobworker ARGS`` with ``stdin`` on a pipe (None: /dev/null, as a terminal is
    treated: ``run`` forwards neither)."""
    return subprocess.run(
        [JOBWORKER, *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        env={**cli.env("alice"), "PYTHONPROFILEIMPORTTIME": "1"},
        timeout=60,
        check=False,
    )


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True
    )


def test_the_check_sees_server_modules() -> None:
    names = imported(python("import jobworker.api.tls, jobworker.hooks.host"))
    assert {"cryptography", "pluggy", "structlog", "importlib.metadata"} <= names


def test_the_check_sees_the_model() -> None:
    names = imported(python("import jobworker.api.wire"))
    assert {"google.protobuf", "jobworker.model", "attrs"} <= names


def test_import_jobworker_client_is_light() -> None:
    names = imported(python("import jobworker.client"))
    assert server_only(names) == []
    assert server_only(names, MODEL) == []


def test_client_commands_import_nothing_of_the_server(cli: Cli) -> None:
    job = traced(cli, "start", "-i", "--", "cat").stdout.strip()
    results = {
        "run": traced(cli, "run", "--", "true"),
        "run, no stdin": traced(cli, "run", "--", "true", stdin=None),
        "start": traced(cli, "start", "--", "true"),
        "write": traced(cli, "write", job, stdin="to cat\n"),
        "logs": traced(cli, "logs", "-f", job),
        "status": traced(cli, "status", job),
        "list": traced(cli, "list"),
        "stop": traced(cli, "stop", job),
        "run --help": traced(cli, "run", "--help"),
    }
    assert {command: server_only(imported(r)) for command, r in results.items()} == {
        command: [] for command in results
    }
    assert results["logs"].stdout == "to cat\n"
    # Starting a job, following it to its end and reading output: without the model
    # (forwarding stdin, which run does from a pipe, is a WriteInput call that loads it).
    light = ("run, no stdin", "start", "logs", "run --help")
    assert {command: server_only(imported(results[command]), MODEL) for command in light} == {
        command: [] for command in light
    }


@pytest.mark.parametrize("command", ["serve", "certs", "plugins"])
def test_server_side_commands_still_load_their_modules(cli: Cli, command: str) -> None:
    assert server_only(imported(traced(cli, command, "--help"))) != []

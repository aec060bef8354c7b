"""A third-party plugin as its users get it: pip-installed next to jobworker, found by name.

One fresh virtual environment gets jobworker (this checkout) and examples/jobworker-policy
from pip, the way an operator installs them; everything after that runs that venv's
``jobworker`` command: ``certs init``, ``serve --plugin policy --plugin audit-log`` and
the client commands. What the plugin did is seen only through the API: a refused job and
its message, a job stopped at its deadline, and ``jobworker plugins`` describing it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.e2e.conftest import STOP_TIMEOUT_S, Server, clean_env, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "jobworker-policy"
PIP_TIMEOUT_S = 600
COMMAND_TIMEOUT_S = 60

POLICY = """
[default]
commands = ["echo"]

[identities.alice]
commands = ["echo", "sleep"]
max_runtime = 1

[identities.root]
commands = ["*"]
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with jobworker and jobworker-policy installed by pip, dependencies too."""
    path = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    subprocess.run(
        [
            *(str(path / "bin" / "python"), "-m", "pip", "install", "--quiet"),
            *("--disable-pip-version-check", str(REPO), str(EXAMPLE)),
        ],
        check=True,
        timeout=PIP_TIMEOUT_S,
        env=clean_env(PIP_NO_INPUT="1"),
    )
    return path


@attrs.frozen
class Installed:
    """The venv's ``jobworker`` command, with a PKI it made: alice (user), root (admin)."""

    venv: Path
    home: Path

    @property
    def pki(self) -> Path:
        return self.home / "pki"

    def env(self, name: str | None = None, server: Server | None = None) -> dict[str, str]:
        env = clean_env(JOBWORKER_HOME=str(self.home / "dev-home"))
        if name is not None and server is not None:
            env.update(
                JOBWORKER_SERVER=server.address,
                JOBWORKER_TLS_CERT=str(self.pki / f"{name}.pem"),
                JOBWORKER_TLS_KEY=str(self.pki / f"{name}-key.pem"),
                JOBWORKER_TLS_CA=str(self.pki / "ca.pem"),
            )
        return env

    def run(
        self, *args: str, as_: str | None = None, server: Server | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / "jobworker"), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env(as_, server),
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )

    def serve(self, *args: str) -> Server:
        port = free_port()
        log_path = self.home / f"serve-{port}.log"
        pki = self.pki
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    *(str(self.venv / "bin" / "jobworker"), "serve"),
                    *("--listen", f"127.0.0.1:{port}", "--tls-cert", str(pki / "server.pem")),
                    *("--tls-key", str(pki / "server-key.pem"), "--tls-ca", str(pki / "ca.pem")),
                    *("--authz", str(pki / "authz.toml"), *args),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
            )
        server = Server(process=process, address=f"127.0.0.1:{port}", log_path=log_path)
        server.wait_ready()
        return server


@pytest.fixture(scope="module")
def installed(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    home = tmp_path_factory.mktemp("home")
    tool = Installed(venv=venv, home=home)
    made = tool.run("certs", "init", "--dir", str(tool.pki), "--client", "alice:user")
    assert made.returncode == 0, made.stderr
    made = tool.run("certs", "init", "--dir", str(tool.pki), "--client", "root:admin")
    assert made.returncode == 0, made.stderr
    (tool.pki / "authz.toml").write_text(
        '[[clients]]\nidentity = "alice"\nrole = "user"\n\n'
        '[[clients]]\nidentity = "root"\nrole = "admin"\n'
    )
    (home / "policy.toml").write_text(POLICY)
    return tool


@pytest.fixture(scope="module")
def server(installed: Installed) -> Iterator[Server]:
    server = installed.serve(
        *("--plugin", "policy", "--policy-file", str(installed.home / "policy.toml")),
        *("--policy-stop-grace", "2"),
        *("--plugin", "audit-log", "--audit-log", str(installed.home / "audit.jsonl")),
    )
    yield server
    assert server.terminate() == 0, server.log()


def audit_records(installed: Installed, name: str = "audit.jsonl") -> list[dict[str, Any]]:
    lines = (installed.home / name).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_plugins_lists_the_installed_plugin_with_version_and_hooks(installed: Installed) -> None:
    result = installed.run("plugins", "--plugin", "policy", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["policy"]["version"] == "0.1.0"
    assert rows["policy"]["hooks"] == [
        "jobworker_add_options",
        "jobworker_configure",
        "jobworker_job_started",
        "jobworker_manager_ready",
        "jobworker_on_exit",
        "jobworker_pre_spawn",
        "jobworker_shutdown",
    ]
    everything = installed.run("plugins", "--json")
    assert everything.returncode == 0, everything.stderr
    assert "policy" in {row["name"] for row in json.loads(everything.stdout)}
    helped = installed.run("serve", "--plugin", "policy", "--help")
    assert "--policy-file FILE" in helped.stdout


def test_command_outside_the_allow_list_is_refused_with_the_plugins_message(
    installed: Installed, server: Server
) -> None:
    refused = installed.run("run", "--", "rm", "-rf", "/tmp/x", as_="alice", server=server)
    assert refused.returncode == 1
    assert refused.stderr == (
        "jobworker: PERMISSION_DENIED: policy: 'rm' is not allowed (allowed: echo, sleep)\n"
    )
    allowed = installed.run("run", "--", "echo", "hello", as_="alice", server=server)
    assert (allowed.returncode, allowed.stdout) == (0, "hello\n")
    anything = installed.run("run", "--", "sh", "-c", "echo $((6*7))", as_="root", server=server)
    assert (anything.returncode, anything.stdout) == (0, "42\n")


def test_job_is_stopped_at_its_deadline(installed: Installed, server: Server) -> None:
    started = time.monotonic()
    ran = installed.run("run", "--", "sleep", "30", as_="alice", server=server)
    elapsed = time.monotonic() - started
    assert ran.returncode == 128 + signal.SIGTERM, ran.stderr
    assert 1 <= elapsed < 10
    listed = installed.run("list", "--json", as_="alice", server=server)
    job = next(j for j in json.loads(listed.stdout) if j["command"].endswith("/sleep"))
    assert (job["reason"], job["stopped_by"], job["escalated"]) == (
        "stopped",
        "policy:max-runtime",
        False,
    )
    assert job["ended_at"] - job["started_at"] == pytest.approx(1, abs=0.5)
    exited = [
        r
        for r in audit_records(installed)
        if r["audit"] == "job_exited" and r["job_id"] == job["job_id"]
    ]
    assert [(r["reason"], r["stopped_by"]) for r in exited] == [("stopped", "policy:max-runtime")]


def test_audit_log_follows_rotation_and_sighup(installed: Installed, server: Server) -> None:
    """logrotate's move and postrotate SIGHUP: the server lives on, records go to a new file."""
    os.rename(installed.home / "audit.jsonl", installed.home / "audit.jsonl.1")
    server.process.send_signal(signal.SIGHUP)
    ran = installed.run("run", "--", "echo", "after rotation", as_="alice", server=server)
    assert ran.returncode == 0, ran.stderr
    assert server.process.poll() is None, server.log()  # SIGHUP did not end the server

    def after_rotation(name: str) -> list[str]:
        records = audit_records(installed, name)
        job_ids = {r["job_id"] for r in records if r.get("args") == ["after rotation"]}
        return [r["audit"] for r in records if r["job_id"] in job_ids and r["audit"] != "decision"]

    assert after_rotation("audit.jsonl") == ["job_started", "job_exited"]
    assert after_rotation("audit.jsonl.1") == []
    assert oct((installed.home / "audit.jsonl").stat().st_mode & 0o777) == "0o600"


def test_stopped_server_leaves_a_complete_audit_trail(installed: Installed) -> None:
    """A server of its own, stopped with SIGTERM: start-up to shutdown, nothing lost."""
    server = installed.serve(
        *("--plugin", "policy", "--policy-file", str(installed.home / "policy.toml")),
        *("--plugin", "audit-log", "--audit-log", str(installed.home / "trail.jsonl")),
    )
    try:
        job = installed.run("start", "--", "sleep", "30", as_="root", server=server)
        assert job.returncode == 0, job.stderr
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(STOP_TIMEOUT_S) == 0, server.log()
    kinds = [(r["audit"], r.get("stopped_by")) for r in audit_records(installed, "trail.jsonl")]
    assert kinds == [
        ("decision", None),
        ("job_started", None),
        ("job_exited", "server-shutdown"),
    ]

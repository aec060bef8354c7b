"""The systemd units docs/install.md installs: valid for systemd (``systemd-analyze
verify``, where it exists), and their command lines are ones jobworker's parser accepts."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from jobworker.cli.main import build_parser
from jobworker.hooks.host import Plugins
from tests.e2e.conftest import JOBWORKER

DOCS = Path(__file__).resolve().parents[2] / "docs"
UNITS = ("jobworker.service", "jobworker-crl.service", "jobworker-crl.timer")
INSTALLED = "/opt/jobworker/bin/jobworker"


def exec_lines(unit: str) -> list[list[str]]:
    """Each ``ExecStart=`` command of ``unit``, continuation lines joined, split as
    systemd does (shell-like quoting)."""
    text = (DOCS / unit).read_text().replace("\\\n", " ")
    return [
        shlex.split(line.split("=", 1)[1])
        for line in text.splitlines()
        if line.startswith("ExecStart=")
    ]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    """The units as installed, but running this checkout's jobworker (verify checks that
    each command exists and is executable)."""
    for unit in UNITS:
        text = (DOCS / unit).read_text().replace(INSTALLED, JOBWORKER)
        (tmp_path / unit).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / unit) for unit in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_the_server_unit_runs_a_command_line_jobworker_accepts() -> None:
    [command] = exec_lines("jobworker.service")
    assert command[0] == INSTALLED
    args = command[1:]
    plugins = Plugins()
    plugins.load_for_server([args[i + 1] for i, arg in enumerate(args) if arg == "--plugin"])
    options = build_parser(plugins).parse_args(args)
    assert options.subcommand == "serve"
    assert str(options.tls_crl) == "/etc/jobworker/ca.crl"  # the CRL certs init writes
    assert str(options.tls_ca) == "/etc/jobworker/ca.pem"
    assert "ExecReload=/bin/kill -HUP $MAINPID" in (DOCS / "jobworker.service").read_text()


def test_the_crl_unit_runs_certs_crl_on_the_servers_pki() -> None:
    [command] = exec_lines("jobworker-crl.service")
    options = build_parser(Plugins()).parse_args(command[1:])
    assert (options.certs_command, str(options.dir)) == ("crl", "/etc/jobworker")


def test_install_md_installs_every_unit() -> None:
    page = (DOCS / "install.md").read_text()
    for unit in UNITS:
        assert f"docs/{unit}" in page, unit
    assert "systemctl enable --now jobworker.service jobworker-crl.timer" in page

"""End-to-end fixtures: the installed ``jobworker`` command, run as a user runs it.

Servers are ``jobworker serve`` subprocesses on a free port of 127.0.0.1. Their log goes
to a file (a pipe nobody reads would block them once full); readiness is the
``server_started`` line in it, waited for with a deadline. Every server started here is
stopped in teardown, killed if SIGTERM does not end it.

Commands run with a clean environment: no ``JOBWORKER_*`` variable of the developer's,
and ``JOBWORKER_HOME`` pointing at an empty directory so their own dev PKI is never used.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs
import pytest

from tests.jobpaths import JOB_VISIBLE_ROOT

#: The console script installed next to this interpreter: what a user runs.
JOBWORKER = str(Path(sys.executable).with_name("jobworker"))
#: Put before a command the test interrupts (SIGINT, as Ctrl-C does): a shell that starts
#: the test run in the background (`cmd &`) ignores SIGINT in it, every process inherits
#: that, and the command must see the signal as a user's terminal would deliver it.
INTERRUPTIBLE = ("env", "--default-signal=INT")
START_TIMEOUT_S = 120.0  # a deadline for a failure, not a target: a loaded machine is slow
STOP_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWORKER_")}
    env.update(extra)
    return env


@attrs.define
class Server:
    """A ``jobworker serve`` subprocess and its log file."""

    process: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, object]]:
        """The JSON log lines (grpc's own C-core lines are not JSON and are skipped)."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))
        return found

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if '"server_started"' in self.log():
                return
            if self.process.poll() is not None:
                pytest.fail(f"jobworker serve exited {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        pytest.fail(f"jobworker serve not ready after {START_TIMEOUT_S}s:\n{self.log()}")

    def terminate(self) -> int:
        """SIGTERM, then wait; SIGKILL (and fail) if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"jobworker serve ignored SIGTERM for {STOP_TIMEOUT_S}s:\n{self.log()}")


StartServer = Callable[..., Server]


def _server_starter(directory: Path) -> tuple[StartServer, list[Server]]:
    started: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True) -> Server:
        port = free_port()
        log_path = directory / f"serve-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [JOBWORKER, "serve", "--listen", f"127.0.0.1:{port}", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env if env is not None else clean_env(JOBWORKER_HOME=str(directory / "home")),
            )
        server = Server(process=process, address=f"127.0.0.1:{port}", log_path=log_path)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    return start, started


def _stop_all(started: Sequence[Server]) -> None:
    for server in started:
        if server.process.poll() is None:
            server.terminate()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start ``jobworker serve --listen 127.0.0.1:<free port> ARGS...``; stopped at teardown."""
    start, started = _server_starter(tmp_path)
    yield start
    _stop_all(started)


@attrs.frozen
class Pki:
    """A PKI made by ``jobworker certs init``: alice (user), root (admin) on the whitelist;
    mallory's certificate was added later, so the whitelist does not list her."""

    directory: Path
    init_output: str

    def server_args(self) -> list[str]:
        d = self.directory
        return [
            f"--tls-cert={d / 'server.pem'}",
            f"--tls-key={d / 'server-key.pem'}",
            f"--tls-ca={d / 'ca.pem'}",
            f"--authz={d / 'authz.toml'}",
        ]

    def client_env(self, name: str, address: str) -> dict[str, str]:
        d = self.directory
        return clean_env(
            JOBWORKER_HOME=str(d / "no-dev-pki"),
            JOBWORKER_SERVER=address,
            JOBWORKER_TLS_CERT=str(d / f"{name}.pem"),
            JOBWORKER_TLS_KEY=str(d / f"{name}-key.pem"),
            JOBWORKER_TLS_CA=str(d / "ca.pem"),
        )


def jobworker(
    *args: str, env: dict[str, str], timeout: float = COMMAND_TIMEOUT_S
) -> subprocess.CompletedProcess[bytes]:
    """Run the installed CLI to completion; output is bytes, exactly as written."""
    return subprocess.run(
        [JOBWORKER, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    env = clean_env(JOBWORKER_HOME=str(directory / "no-dev-pki"))
    first = jobworker(
        "certs", "init", "--dir", str(directory), "--client", "alice:user", "--client",
        "root:admin", env=env,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    later = jobworker("certs", "init", "--dir", str(directory), "--client", "mallory", env=env)
    assert later.returncode == 0, later.stderr
    return Pki(directory=directory, init_output=first.stdout.decode() + later.stdout.decode())


@pytest.fixture(scope="session")
def server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server shared by the tests that only touch jobs they start themselves."""
    directory = tmp_path_factory.mktemp("server")
    start, started = _server_starter(directory)
    yield start(
        *pki.server_args(),
        f"--spool-dir={directory / 'spool'}",
        f"--isolation-writable={JOB_VISIBLE_ROOT}",
    )
    _stop_all(started)


@attrs.frozen
class Cli:
    """``jobworker`` as one identity of ``pki`` against ``server``."""

    pki: Pki
    server: Server

    def env(self, name: str) -> dict[str, str]:
        return self.pki.client_env(name, self.server.address)

    def __call__(self, *args: str, as_: str = "alice") -> subprocess.CompletedProcess[bytes]:
        return jobworker(*args, env=self.env(as_))

    def ok(self, *args: str, as_: str = "alice") -> str:
        result = self(*args, as_=as_)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    def status(self, job_id: str, as_: str = "alice") -> dict[str, object]:
        data: dict[str, object] = json.loads(self.ok("status", "--json", "--", job_id, as_=as_))
        return data


@pytest.fixture
def cli(pki: Pki, server: Server) -> Cli:
    return Cli(pki=pki, server=server)

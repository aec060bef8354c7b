"""A real local Ray cluster and real front servers for the cluster backend's tests.

One cluster per test session (about 10 s and 1 GB): a head that takes no jobs and three
worker nodes with different resources, all bound to 127.0.0.1:

* ``w1``: 1 CPU, 1 GiB; ``w2``: 1 CPU, 3 GiB -- two 1-CPU jobs must go one to each;
* ``w3``: 1 CPU, 1 GiB -- only for the test that kills its raylet (the other tests never
  pin to it, and it is gone after that test).

Front servers are ``jobworker serve --plugin ray`` subprocesses with real mutual TLS (the
test PKI of tests/serverfixtures.py) and the audit log, so a test can SIGKILL one and start
another, as an operator would. Ray's health check is shortened so that a lost node is
declared dead in about 5 s instead of 15 s.

The cluster uses token authentication, as docs/cluster.md sets one up: every Ray process
and every front server gets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``. The token
file is left readable by every account, in a directory jobs could see (under /run when
the tests run as root), so that only the agent's hiding it keeps it from jobs.

Skipped when Ray (the ``ray`` extra) is not installed. (The directory is not called
``ray``: ``tests/`` is on ``sys.path`` under pytest, and ``tests/ray`` would pass for the
``ray`` package as a namespace package where Ray is not installed.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import grpc
import pytest

import jobworker.api.tls  # noqa: F401  (before grpc: refuse TLS 1.2 as production does)
from jobworker.api.pki import PkiPaths
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.ray_cluster.cluster import RAY_ENV, LocalCluster, local_cluster, token_auth
from tests.serverfixtures import client_credentials, make_api_pki

HAVE_RAY = importlib.util.find_spec("ray") is not None

JOBWORKER = str(Path(sys.executable).with_name("jobworker"))
GIB = 1 << 30
NODES = [
    {"name": "head", "num_cpus": 0, "memory": GIB},
    {"name": "w1", "num_cpus": 1, "memory": GIB},
    {"name": "w2", "num_cpus": 1, "memory": 3 * GIB},
    {"name": "w3", "num_cpus": 1, "memory": GIB},
]
FAST_HEALTH_CHECK = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
PLACEMENT_TIMEOUT_S = 2.0
FRONT_START_TIMEOUT_S = 60.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.ray)
            if not HAVE_RAY:
                item.add_marker(pytest.mark.skip(reason="needs Ray: pip install 'jobworker[ray]'"))


@attrs.frozen
class RayToken:
    path: Path
    value: str
    #: What every Ray process and front server of the cluster is started with.
    env: dict[str, str]


@pytest.fixture(scope="session")
def ray_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayToken]:
    parent = "/run" if os.access("/run", os.W_OK) else None
    directory = Path(tempfile.mkdtemp(prefix="jw-raytoken-", dir=parent))
    try:
        directory.chmod(0o755)
        path = directory / "auth_token"
        env = token_auth(path, mode=0o644)
        yield RayToken(path, path.read_text(), env)
    finally:
        shutil.rmtree(directory)


@pytest.fixture(scope="session")
def ray_cluster(
    tmp_path_factory: pytest.TempPathFactory, ray_token: RayToken
) -> Iterator[LocalCluster]:
    log_path = tmp_path_factory.mktemp("ray") / "cluster.log"
    with local_cluster(NODES, log_path, env={**FAST_HEALTH_CHECK, **ray_token.env}) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def ray_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return make_api_pki(tmp_path_factory.mktemp("ray-pki"))


@attrs.define
class Front:
    """A ``jobworker serve --plugin ray`` subprocess."""

    process: subprocess.Popen[bytes]
    address: str
    log_path: Path
    audit_path: Path
    pki: PkiPaths
    channels: list[grpc.Channel] = attrs.Factory(list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def foreign_lines(self) -> list[str]:
        """Lines of its stdout and stderr that are not JSON records (Ray's own output)."""
        found = []
        for line in self.log().splitlines():
            try:
                json.loads(line)
            except ValueError:
                found.append(line)
        return found

    def audit(self) -> list[dict[str, object]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def stub(self, name: str) -> pb_grpc.JobServiceStub:
        channel = grpc.secure_channel(self.address, client_credentials(self.pki.client(name)))
        self.channels.append(channel)
        return pb_grpc.JobServiceStub(channel)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._close()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()

    def _close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.channels.clear()


StartFront = Callable[..., Front]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.frozen
class ServeCommand:
    """``jobworker serve --plugin ray`` for one port, and its environment."""

    argv: list[str]
    env: dict[str, str]
    address: str
    log_path: Path
    audit_path: Path


MakeServe = Callable[..., ServeCommand]


@pytest.fixture(scope="session")
def serve_command(
    ray_cluster: LocalCluster,
    ray_pki: PkiPaths,
    ray_token: RayToken,
    tmp_path_factory: pytest.TempPathFactory,
) -> MakeServe:
    """The command of a front server: on the session's cluster with its token, unless
    ``ray_address`` and ``ray_env`` say otherwise."""
    directory = tmp_path_factory.mktemp("fronts")

    def make(
        *extra: str, ray_address: str | None = None, ray_env: dict[str, str] | None = None
    ) -> ServeCommand:
        port = _free_port()
        audit_path = directory / f"audit-{port}.jsonl"
        files = ray_pki.server()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWORKER_", "RAY_"))}
        env.update(RAY_ENV, JOBWORKER_HOME=str(directory / "home"))
        env.update(ray_token.env if ray_env is None else ray_env)
        argv = [
            JOBWORKER, "serve", "--listen", f"127.0.0.1:{port}",
            f"--tls-cert={files.cert}", f"--tls-key={files.key}",
            f"--tls-ca={files.ca}", f"--authz={ray_pki.authz}",
            "--plugin", "ray", f"--ray-address={ray_address or ray_cluster.address}",
            f"--ray-placement-timeout={PLACEMENT_TIMEOUT_S}",
            f"--ray-spool-dir={directory / 'node-spool'}",
            "--plugin", "audit-log", f"--audit-log={audit_path}",
            f"--spool-dir={directory / 'front-spool'}", "--grace=2",
            *extra,
        ]  # fmt: skip
        log_path = directory / f"serve-{port}.log"
        return ServeCommand(argv, env, f"127.0.0.1:{port}", log_path, audit_path)

    return make


@pytest.fixture(scope="session")
def started_fronts() -> list[Front]:
    """Every front server the session started (a job's end is recorded by one of them:
    the first to report it, docs/cluster.md)."""
    return []


@pytest.fixture(scope="session")
def start_front(
    serve_command: MakeServe, ray_pki: PkiPaths, started_fronts: list[Front]
) -> Iterator[StartFront]:
    """Start a front server (arguments as ``serve_command``), once it has found the
    cluster's nodes unless ``discovered=False``; every one is stopped at the end."""
    started = started_fronts

    def start(*extra: str, discovered: bool = True, **where: object) -> Front:
        command = serve_command(*extra, **where)
        with command.log_path.open("wb") as log:
            process = subprocess.Popen(
                command.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=command.env,
            )  # fmt: skip
        front = Front(process, command.address, command.log_path, command.audit_path, ray_pki)
        started.append(front)
        deadline = time.monotonic() + FRONT_START_TIMEOUT_S
        # The server answers at once; ``discovered``: also wait for its first look at the
        # cluster's nodes (tests that expect every node and its jobs known).
        ready = ['"server_started"', *(['"ray_nodes_discovered"'] if discovered else [])]
        while not all(event in front.log() for event in ready):
            if process.poll() is not None or time.monotonic() > deadline:
                front.terminate()
                pytest.fail(f"the front server did not start:\n{front.log()}")
            time.sleep(0.1)
        return front

    yield start
    for front in started:
        front.terminate()


@pytest.fixture(scope="session")
def front(start_front: StartFront) -> Front:
    """The front server most tests share (they only touch jobs they start)."""
    return start_front()

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

Skipped when Ray (the ``ray`` extra) is not installed. (The directory is not called
``ray``: ``tests/`` is on ``sys.path`` under pytest, and ``tests/ray`` would pass for the
``ray`` package as a namespace package where Ray is not installed.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import grpc
import pytest

import jobworker.api.tls  # noqa: F401  (before grpc: refuse TLS 1.2 as production does)
from jobworker.api.pki import PkiPaths
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.ray_cluster.cluster import RAY_ENV, LocalCluster, local_cluster
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


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    log_path = tmp_path_factory.mktemp("ray") / "cluster.log"
    with local_cluster(NODES, log_path, env=FAST_HEALTH_CHECK) as cluster:
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


@pytest.fixture(scope="session")
def start_front(
    ray_cluster: LocalCluster, ray_pki: PkiPaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartFront]:
    """Start a front server on the session's cluster; every one is stopped at the end."""
    directory = tmp_path_factory.mktemp("fronts")
    started: list[Front] = []

    def start(*extra: str) -> Front:
        port = _free_port()
        log_path = directory / f"serve-{port}.log"
        audit_path = directory / f"audit-{port}.jsonl"
        files = ray_pki.server()
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWORKER_")}
        env.update(RAY_ENV, JOBWORKER_HOME=str(directory / "home"))
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    JOBWORKER, "serve", "--listen", f"127.0.0.1:{port}",
                    f"--tls-cert={files.cert}", f"--tls-key={files.key}",
                    f"--tls-ca={files.ca}", f"--authz={ray_pki.authz}",
                    "--plugin", "ray", f"--ray-address={ray_cluster.address}",
                    f"--ray-placement-timeout={PLACEMENT_TIMEOUT_S}",
                    f"--ray-spool-dir={directory / 'node-spool'}",
                    "--plugin", "audit-log", f"--audit-log={audit_path}",
                    f"--spool-dir={directory / 'front-spool'}", "--grace=2",
                    *extra,
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        front = Front(process, f"127.0.0.1:{port}", log_path, audit_path, ray_pki)
        started.append(front)
        deadline = time.monotonic() + FRONT_START_TIMEOUT_S
        while '"server_started"' not in front.log():
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

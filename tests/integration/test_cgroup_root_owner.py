"""A cgroup root belongs to one server: nothing one ``jobworker serve --plugin cgroupv2``
does touches another's jobs, whatever the order they start in.

Real servers (subprocesses) on the hybrid host's cgroup2 mount, each test under fresh
roots of its own (see test_cgroup_hybrid.py).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobworker.api.pki import PkiPaths
from jobworker.v1 import jobworker_pb2 as pb
from tests.integration.test_cgroup_hybrid import UNIFIED, _force_remove, _skip_reason
from tests.integration.test_reliability import ServeProcess, alive
from tests.jobpaths import JOB_VISIBLE_ROOT

#: Generous: the same tests run in the VM, where Python is many times slower (TCG).
RPC_S = 60.0

pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture
def root() -> Iterator[Path]:
    path = UNIFIED / f"jobworker-test-{secrets.token_hex(4)}"
    try:
        yield path
    finally:
        _force_remove(path)


def _serve(pki: PkiPaths, tmp_path: Path, name: str, root: Path) -> ServeProcess:
    # No network for the jobs: these tests also run in the test VM, which has none to give
    # (no route out, no tun or nf_tables module for a private one).
    extra = ("--plugin", "cgroupv2", "--cgroup-root", str(root), "--job-network", "none")
    return ServeProcess(pki, tmp_path / f"spool-{name}", tmp_path / f"{name}.log", extra=extra)


def _serve_failing(pki: PkiPaths, tmp_path: Path, root: Path, listen: str) -> str:
    """Run a server that must refuse to start; its error output."""
    files = pki.server()
    args = ["serve", "--listen", listen, "--spool-dir", str(tmp_path / "spool-refused")]
    args += ["--tls-cert", str(files.cert), "--tls-key", str(files.key)]
    args += ["--tls-ca", str(files.ca), "--authz", str(pki.authz)]
    args += ["--isolation-writable", str(JOB_VISIBLE_ROOT)]
    args += ["--plugin", "cgroupv2", "--cgroup-root", str(root)]
    result = subprocess.run(
        [sys.executable, "-m", "jobworker", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0, result.stdout.decode()[-2000:]
    return result.stderr.decode()


def _running_job(server: ServeProcess) -> tuple[str, int]:
    alice = server.stub("alice")
    request = pb.StartJobRequest(command="sleep", args=["600"])
    job_id: str = alice.StartJob(request, timeout=RPC_S).job_id
    return job_id, alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=RPC_S).pid


def _still_running(server: ServeProcess, job_id: str, pid: int) -> bool:
    status = server.stub("alice").GetStatus(pb.JobRequest(job_id=job_id), timeout=RPC_S)
    return status.status == "running" and alive(pid)


def test_a_second_server_on_a_held_root_refuses_to_start_and_touches_nothing(
    api_pki: PkiPaths, tmp_path: Path, root: Path
) -> None:
    first = _serve(api_pki, tmp_path, "first", root)
    job_id, pid = _running_job(first)
    # On another port: refused once listening, before any clean-up, naming the holder.
    error = _serve_failing(api_pki, tmp_path, root, "127.0.0.1:0")
    assert error.splitlines()[-1] == (
        f"jobworker: error: cgroup root {root} is in use by another jobworker server (pid"
        f" {first.pid}): give this one a --cgroup-root of its own"
    )
    # On the first one's port: refused before listening, and so before any clean-up.
    error = _serve_failing(api_pki, tmp_path, root, first.address)
    assert "is already in use" in error.splitlines()[-1]
    assert _still_running(first, job_id, pid)
    assert first.terminate() == 0
    assert not alive(pid)


@pytest.mark.parametrize("outer_first", [True, False], ids=["outer-first", "inner-first"])
def test_two_servers_on_nested_roots_keep_each_others_jobs(
    api_pki: PkiPaths, tmp_path: Path, root: Path, outer_first: bool
) -> None:
    """The worst case for a start-up sweep: one server's root is a child cgroup of the
    other's. Neither created the other's cgroups, so neither removes them."""
    inner_root = root / "inner"
    if not outer_first:
        root.mkdir()  # the inner server's root needs its parent
    order = [("outer", root), ("inner", inner_root)]
    servers = {}
    jobs = {}
    for name, path in order if outer_first else reversed(order):
        servers[name] = _serve(api_pki, tmp_path, name, path)
        jobs[name] = _running_job(servers[name])
    for name, (job_id, pid) in jobs.items():
        assert _still_running(servers[name], job_id, pid), name
    # Each stops its own jobs, and only those.
    assert servers["inner"].terminate() == 0
    assert not alive(jobs["inner"][1])
    assert _still_running(servers["outer"], *jobs["outer"])
    assert servers["outer"].terminate() == 0
    assert not alive(jobs["outer"][1])

"""Output cannot fill the disk silently (a cap per job, a spool budget, a full disk), and
the streams one client may hold open are bounded, and followers that give up are freed.

Real servers over mTLS, real jobs; the spool is a small tmpfs mounted by the test in its
own directory (root only) and unmounted after.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobworker import hookimpl
from jobworker.api.pki import PkiPaths
from jobworker.v1 import jobworker_pb2 as pb
from tests.serverfixtures import RPC_TIMEOUT_S, authz_plugins, running_server, start_job

MiB = 1 << 20


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs: the disk a flood fills."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def follow(stub: object, job_id: str, offset: int = 0) -> tuple[int, grpc.RpcError | None]:
    """Bytes received, and the error the stream ended with (None for a clean end)."""
    received = 0
    try:
        for chunk in stub.StreamOutput(  # type: ignore[attr-defined]
            pb.JobRequest(job_id=job_id, offset=offset), timeout=60
        ):
            assert chunk.data == bytes(len(chunk.data))
            received += len(chunk.data)
            follow.last_offset = chunk.offset  # type: ignore[attr-defined]
    except grpc.RpcError as err:
        return received, err
    return received, None


def status(stub: object, job_id: str) -> pb.JobStatusResponse:
    reply: pb.JobStatusResponse = stub.GetStatus(  # type: ignore[attr-defined]
        pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S
    )
    return reply


def wait_ended(stub: object, job_id: str) -> pb.JobStatusResponse:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reply = status(stub, job_id)
        if reply.status == "exited":
            return reply
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")


def test_a_job_past_its_cap_is_cut_and_says_so(api_pki: PkiPaths, tmp_path: Path) -> None:
    with running_server(api_pki, spool_dir=tmp_path / "spool", max_output_bytes=MiB) as server:
        alice, bob = server.stub("alice"), server.stub("bob")
        flood = start_job(alice, "head", "-c", str(3 * MiB), "/dev/zero")
        quiet = start_job(bob, "head", "-c", str(MiB // 2), "/dev/zero")
        received, err = follow(alice, flood)
        assert err is not None and err.code() is grpc.StatusCode.DATA_LOSS
        assert f"cut after {MiB} bytes kept" in (err.details() or "")
        assert "--max-output-bytes" in (err.details() or "")
        assert received == MiB
        final = wait_ended(alice, flood)
        assert final.exit_code == 0 and final.reason == "exited"  # the job went on
        assert final.output_truncated
        assert (final.output_bytes, final.output_kept_bytes) == (3 * MiB, MiB)
        # A follower that resumes at the cut is told at once.
        resumed, err = follow(alice, flood, offset=follow.last_offset)  # type: ignore[attr-defined]
        assert resumed == 0 and err is not None and err.code() is grpc.StatusCode.DATA_LOSS
        # The other client's job is intact, and its stream ends cleanly.
        assert follow(bob, quiet) == (MiB // 2, None)
        other = status(bob, quiet)
        assert not other.output_truncated
        assert other.output_kept_bytes == other.output_bytes == MiB // 2


def test_a_full_spool_disk_cuts_the_output_and_says_so(
    api_pki: PkiPaths, small_spool: Path
) -> None:
    # The budget larger than the disk: the disk fills and the write fails.
    with running_server(
        api_pki, spool_dir=small_spool, max_output_bytes=None, max_spool_bytes=1 << 30
    ) as server:
        alice = server.stub("alice")
        flood = start_job(alice, "head", "-c", str(200 * MiB), "/dev/zero")
        received, err = follow(alice, flood)
        assert err is not None and err.code() is grpc.StatusCode.DATA_LOSS, err
        assert "No space left on device" in (err.details() or "")
        final = wait_ended(alice, flood)
        assert final.exit_code == 0
        assert final.output_truncated and final.output_bytes == 200 * MiB
        assert received == final.output_kept_bytes < 20 * MiB


def test_one_client_filling_its_share_of_the_spool_never_cuts_another(
    api_pki: PkiPaths, small_spool: Path
) -> None:
    # The default budget (90% of the 20 MiB tmpfs's free space), a client's default share
    # (a quarter of it: 4.5 MiB), and a cap per job above the share.
    with running_server(api_pki, spool_dir=small_spool, max_output_bytes=8 * MiB) as server:
        alice, bob = server.stub("alice"), server.stub("bob")
        floods = []
        for _ in range(3):  # 600 MiB, 24 MiB of caps: without shares, the whole budget
            job_id = start_job(alice, "head", "-c", str(200 * MiB), "/dev/zero")
            floods.append(job_id)
            received, err = follow(alice, job_id)
            assert err is not None and err.code() is grpc.StatusCode.DATA_LOSS
            final = wait_ended(alice, job_id)
            assert final.output_truncated and received == final.output_kept_bytes
        kept = [status(alice, j).output_kept_bytes for j in floods]
        assert 4 * MiB < kept[0] < 5 * MiB and kept[1:] == [0, 0], kept
        _, err = follow(alice, floods[2])
        assert err is not None and "alice's share of the server's spool" in (err.details() or "")
        # Bob's output arrives whole, up to his own share.
        for size in (MiB, 3 * MiB):
            job_id = start_job(bob, "head", "-c", str(size), "/dev/zero")
            received, err = follow(bob, job_id)
            assert (received, err) == (size, None)
            assert not status(bob, job_id).output_truncated


def test_streams_per_client_are_bounded(api_pki: PkiPaths, tmp_path: Path) -> None:
    with running_server(api_pki, spool_dir=tmp_path / "spool", max_streams_per_client=2) as server:
        alice, bob = server.stub("alice"), server.stub("bob")
        job_id = start_job(alice, "sleep", "30")
        admin_job = start_job(bob, "sleep", "30")
        open_calls = [
            alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=60) for _ in range(2)
        ]
        time.sleep(0.5)  # both admitted and waiting for output
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "alice has 2 output streams open" in (refused.value.details() or "")
        assert "--max-streams-per-client 2" in (refused.value.details() or "")
        # Another client is not affected.
        bob_call = bob.StreamOutput(pb.JobRequest(job_id=admin_job), timeout=60)
        time.sleep(0.5)
        assert bob_call.running()
        # A stream that ends frees its slot.
        open_calls[0].cancel()
        deadline = time.monotonic() + 10
        while True:
            call = alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=60)
            time.sleep(0.2)
            if call.running() or time.monotonic() > deadline:
                break
        assert call.running()
        for c in (call, open_calls[1], bob_call):
            c.cancel()
        for j, stub in ((job_id, alice), (admin_job, bob)):
            stub.StopJob(pb.JobRequest(job_id=j, grace_seconds=0), timeout=RPC_TIMEOUT_S)


class _KeepManager:
    """A plugin that keeps the server's job manager, to look inside it."""

    manager: Any = None

    @hookimpl
    def jobworker_manager_ready(self, manager: Any) -> None:
        self.manager = manager


def test_followers_that_gave_up_leave_no_waiter(api_pki: PkiPaths, tmp_path: Path) -> None:
    keeper = _KeepManager()
    plugins = authz_plugins(api_pki.authz)
    plugins.register(keeper, name="keep-manager")
    with running_server(api_pki, spool_dir=tmp_path / "spool", plugins=plugins) as server:
        alice = server.stub("alice")
        job_id = start_job(alice, "sleep", "60")  # writes nothing

        async def waiters() -> int:
            return len(keeper.manager._table.jobs[job_id].log._waiters)

        calls = [alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=60) for _ in range(50)]
        deadline = time.monotonic() + 20
        while server.call(waiters()) < 50 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.call(waiters()) == 50
        for call in calls:
            call.cancel()
        while server.call(waiters()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.call(waiters()) == 0
        alice.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=0), timeout=RPC_TIMEOUT_S)

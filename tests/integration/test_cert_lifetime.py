"""A certificate is good for what it says: not past its notAfter, on a connection opened
before it, nor on a stream that was admitted while it was still valid."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from jobworker.api.pki import PkiPaths
from jobworker.v1 import jobworker_pb2 as pb
from tests.serverfixtures import make_api_pki, running_server, start_job, wait_exited
from tests.tlsfixtures import add_client

T = 10.0
#: How long alice's certificate is valid from the moment it is minted.
LIFETIME = timedelta(seconds=6)
#: How long a test waits, at most, for what should happen within about a second.
BOUND = 15.0


@pytest.fixture
def brief_pki(tmp_path: Path) -> tuple[PkiPaths, datetime]:
    """The test PKI with alice's certificate replaced by one that expires in seconds."""
    paths = make_api_pki(tmp_path / "pki")
    not_after = (datetime.now(UTC) + LIFETIME).replace(microsecond=0)
    for old in (paths.client_cert("alice"), paths.client_key("alice")):
        old.unlink()
    add_client(paths, "alice", not_after=not_after)
    return paths, not_after


def _until(moment: datetime) -> None:
    time.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()) + 0.2)


def _collect(call: Iterator[bytes], into: list[object]) -> None:
    try:
        for chunk in call:
            into.append(chunk)
    except grpc.RpcError as err:
        into.append(err)


def test_expiry_ends_rpcs_and_open_streams_on_an_open_connection(
    brief_pki: tuple[PkiPaths, datetime],
) -> None:
    paths, not_after = brief_pki
    with running_server(paths) as server:
        alice = server.stub("alice")
        ticker = start_job(alice, "sh", "-c", "while :; do echo tick; sleep 0.2; done")
        reader = start_job(alice, "cat", stdin=True)
        # A stream following output, and a WriteInput stream waiting for its next chunk.
        received: list[object] = []
        follow = threading.Thread(
            target=_collect, args=(alice.StreamOutput(pb.JobRequest(job_id=ticker)), received)
        )
        follow.start()
        feed: queue.Queue[pb.InputChunk | None] = queue.Queue()
        feed.put(pb.InputChunk(job_id=reader, data=b"before\n"))

        def chunks() -> Iterator[pb.InputChunk]:
            while (item := feed.get()) is not None:
                yield item

        writer_outcome: list[object] = []
        writer = threading.Thread(
            target=lambda: writer_outcome.append(
                _outcome(lambda: alice.WriteInput(chunks(), timeout=60))
            )
        )
        writer.start()
        assert alice.ListJobs(pb.ListJobsRequest(), timeout=T).jobs  # valid: served

        _until(not_after)
        follow.join(BOUND)
        assert not follow.is_alive(), "the stream outlived its certificate"
        error = received[-1]
        assert isinstance(error, grpc.RpcError), received[-3:]
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired" in error.details()
        assert any(isinstance(c, pb.JobOutputChunk) for c in received)  # it was live before
        writer.join(BOUND)
        feed.put(None)  # (a writer still open would end here, and fail below)
        assert writer_outcome and writer_outcome[0] == grpc.StatusCode.UNAUTHENTICATED

        # A new RPC on the same channel (the connection of the valid certificate).
        with pytest.raises(grpc.RpcError) as info:
            alice.ListJobs(pb.ListJobsRequest(), timeout=T)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "alice: the client certificate" in info.value.details()
        assert "expired on" in info.value.details()

        # Jobs go on; another client is served.
        root = server.stub("root")
        status = root.GetStatus(pb.JobRequest(job_id=ticker), timeout=T)
        assert status.status == "running"
        for job_id in (ticker, reader):
            root.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=0), timeout=T)
            wait_exited(root, job_id)


def _outcome(call: object) -> object:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code()
    return "ok"

"""WriteInput: a job's stdin over the API, with real mTLS and real (isolated) processes."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from jobworker.v1 import jobworker_pb2 as pb
from tests.serverfixtures import RPC_TIMEOUT_S, RunningServer, output_of, start_job, wait_exited

T = RPC_TIMEOUT_S


def chunks(
    job_id: str, data: bytes, size: int = 256 << 10, eof: bool = True
) -> Iterator[pb.InputChunk]:
    yield pb.InputChunk(job_id=job_id)
    for at in range(0, len(data), size):
        yield pb.InputChunk(data=data[at : at + size])
    if eof:
        yield pb.InputChunk(eof=True)


def stdout_of(api_server: RunningServer, job_id: str) -> bytes:
    return b"".join(d for s, d in output_of(api_server.stub("alice"), job_id) if s == "stdout")


def test_20_mb_of_random_bytes_round_trip_through_cat_and_sha256sum(
    api_server: RunningServer,
) -> None:
    stub = api_server.stub("alice")
    data = os.urandom(20 << 20)
    cat = start_job(stub, "cat", stdin=True)
    reply = stub.WriteInput(chunks(cat, data), timeout=60)
    assert (reply.bytes_written, reply.closed) == (len(data), True)
    assert wait_exited(stub, cat).exit_code == 0
    assert (
        hashlib.sha256(stdout_of(api_server, cat)).hexdigest() == hashlib.sha256(data).hexdigest()
    )
    summer = start_job(stub, "sha256sum", stdin=True)
    stub.WriteInput(chunks(summer, data), timeout=60)
    assert wait_exited(stub, summer).exit_code == 0
    assert stdout_of(api_server, summer).split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_nul_bytes_and_eof_in_the_same_message(api_server: RunningServer) -> None:
    stub = api_server.stub("alice")
    job_id = start_job(stub, "od", "-An", "-c", stdin=True)
    stub.WriteInput(iter([pb.InputChunk(job_id=job_id, data=b"a\0b\0\0", eof=True)]), timeout=T)
    assert wait_exited(stub, job_id).exit_code == 0
    assert stdout_of(api_server, job_id).split() == [b"a", b"\\0", b"b", b"\\0", b"\\0"]


def test_writers_may_take_turns_until_eof(api_server: RunningServer) -> None:
    stub = api_server.stub("alice")
    job_id = start_job(stub, "cat", stdin=True)
    first = stub.WriteInput(chunks(job_id, b"one ", eof=False), timeout=T)
    assert (first.bytes_written, first.closed) == (4, False)
    stub.WriteInput(chunks(job_id, b"two"), timeout=T)
    assert wait_exited(stub, job_id).exit_code == 0
    assert stdout_of(api_server, job_id) == b"one two"
    late = stub.WriteInput(chunks(job_id, b"late"), timeout=T)
    assert (late.bytes_written, late.closed) == (0, True)


def test_a_job_started_without_stdin_refuses_writers(api_server: RunningServer) -> None:
    stub = api_server.stub("alice")
    job_id = start_job(stub, "sleep", "30")
    try:
        with pytest.raises(grpc.RpcError) as raised:
            stub.WriteInput(chunks(job_id, b"x"), timeout=T)
        assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "started without stdin" in raised.value.details()
        assert "-i" in raised.value.details()
    finally:
        stub.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=0), timeout=T)


@pytest.mark.parametrize(
    ("who", "code"),
    [("bob", grpc.StatusCode.NOT_FOUND), ("mallory", grpc.StatusCode.PERMISSION_DENIED)],
)
def test_only_the_owner_or_an_admin_writes(
    api_server: RunningServer, who: str, code: grpc.StatusCode
) -> None:
    stub = api_server.stub("alice")
    job_id = start_job(stub, "cat", stdin=True)
    with pytest.raises(grpc.RpcError) as raised:
        api_server.stub(who).WriteInput(chunks(job_id, b"intruder"), timeout=T)
    assert raised.value.code() is code
    api_server.stub("root").WriteInput(chunks(job_id, b"admin"), timeout=T)
    assert wait_exited(stub, job_id).exit_code == 0
    assert stdout_of(api_server, job_id) == b"admin"


def test_a_second_concurrent_writer_is_refused(api_server: RunningServer) -> None:
    stub = api_server.stub("alice")
    job_id = start_job(stub, "cat", stdin=True)
    release = threading.Event()

    def held() -> Iterator[pb.InputChunk]:
        yield pb.InputChunk(job_id=job_id, data=b"first")
        release.wait(T)

    first = stub.WriteInput.future(held(), timeout=T)
    time.sleep(0.5)  # the first call is admitted and holds stdin
    try:
        with pytest.raises(grpc.RpcError) as raised:
            stub.WriteInput(chunks(job_id, b"second"), timeout=T)
        assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "another client is writing" in raised.value.details()
    finally:
        release.set()
    assert first.result().bytes_written == 5
    stub.WriteInput(chunks(job_id, b""), timeout=T)
    assert wait_exited(stub, job_id).exit_code == 0


def test_a_slow_reader_slows_the_writer_and_the_server_buffers_a_bounded_amount(
    api_server: RunningServer,
) -> None:
    """A job that does not read yet: the writer gets only a few MiB in (the pipe, one
    message, HTTP/2 windows), not the 64 MiB it offers."""
    stub = api_server.stub("alice")
    job_id = start_job(stub, "sh", "-c", "sleep 3; cat >/dev/null", stdin=True)
    taken = 0
    block = b"\xa5" * (256 << 10)

    def offered() -> Iterator[pb.InputChunk]:
        nonlocal taken
        yield pb.InputChunk(job_id=job_id)
        for _ in range(256):
            taken += len(block)
            yield pb.InputChunk(data=block)
        yield pb.InputChunk(eof=True)

    call = stub.WriteInput.future(offered(), timeout=60)
    time.sleep(2)
    assert taken <= 16 << 20, f"the server took {taken >> 20} MiB from the writer"
    assert call.result().bytes_written == 64 << 20
    assert wait_exited(stub, job_id).exit_code == 0


def test_a_job_that_never_reads_ends_the_writer_when_it_exits(api_server: RunningServer) -> None:
    stub = api_server.stub("alice")
    job_id = start_job(stub, "sh", "-c", "sleep 1; exit 4", stdin=True)

    def endless() -> Iterator[pb.InputChunk]:
        yield pb.InputChunk(job_id=job_id)
        while True:
            yield pb.InputChunk(data=b"\0" * (64 << 10))

    started = time.monotonic()
    reply = stub.WriteInput(endless(), timeout=30)
    assert reply.closed
    assert time.monotonic() - started < 15
    assert wait_exited(stub, job_id).exit_code == 4


def test_a_first_message_without_a_job_id_is_not_found(api_server: RunningServer) -> None:
    stub = api_server.stub("alice")
    with pytest.raises(grpc.RpcError) as raised:
        stub.WriteInput(iter([pb.InputChunk(data=b"x")]), timeout=T)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


def test_later_messages_may_not_name_another_job(api_server: RunningServer) -> None:
    stub = api_server.stub("alice")
    job_id = start_job(stub, "cat", stdin=True)
    with pytest.raises(grpc.RpcError) as raised:
        stub.WriteInput(
            iter([pb.InputChunk(job_id=job_id, data=b"x"), pb.InputChunk(job_id="other")]),
            timeout=T,
        )
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "one WriteInput call writes to one job" in raised.value.details()
    stub.WriteInput(chunks(job_id, b""), timeout=T)
    assert stdout_of(api_server, job_id) == b"x"

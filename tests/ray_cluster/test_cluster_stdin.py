"""stdin of cluster jobs: WriteInput through the front to the node's agent, byte-exact,
with the byte count and the closing a single server gives."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import grpc
import pytest

from jobworker.api.pki import PkiPaths
from jobworker.v1 import jobworker_pb2 as pb
from tests.ray_cluster.conftest import Front
from tests.ray_cluster.test_cluster import cli_of
from tests.serverfixtures import output_of, start_job, wait_exited

PIECE = 64 << 10


def test_a_pipe_into_run_reaches_cat_on_a_node(front: Front, ray_pki: PkiPaths) -> None:
    ran = cli_of(front, ray_pki)("run", "--", "cat", stdin_bytes=b"hi\n")
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, b"hi\n", b"")


def test_20_mb_of_random_bytes_through_sha256sum_on_a_node(front: Front, ray_pki: PkiPaths) -> None:
    data = os.urandom(20 << 20)
    ran = cli_of(front, ray_pki)("run", "--node", "w2", "--", "sha256sum", stdin_bytes=data)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == f"{hashlib.sha256(data).hexdigest()}  -\n".encode()


def _chunks(job_id: str, data: bytes, eof: bool) -> Iterator[pb.InputChunk]:
    for start in range(0, len(data), PIECE):
        yield pb.InputChunk(job_id=job_id, data=data[start : start + PIECE])
    if eof:
        yield pb.InputChunk(job_id=job_id, eof=True)


def test_write_input_counts_bytes_and_closes_as_on_one_server(front: Front) -> None:
    alice = front.stub("alice")
    job_id = start_job(alice, "wc", "-c", stdin=True, node="w1")
    first = alice.WriteInput(_chunks(job_id, b"x" * 300_000, eof=False), timeout=60)
    assert (first.bytes_written, first.closed) == (300_000, False)  # open for another writer
    second = alice.WriteInput(_chunks(job_id, b"y" * 1000, eof=True), timeout=60)
    assert (second.bytes_written, second.closed) == (1000, True)
    assert wait_exited(alice, job_id).exit_code == 0
    assert output_of(alice, job_id) == [("stdout", b"301000\n")]
    # As on a single server: a finished job's stdin takes nothing, and says it is closed.
    late = alice.WriteInput(_chunks(job_id, b"late", eof=False), timeout=60)
    assert (late.bytes_written, late.closed) == (0, True)
    without = start_job(alice, "true", node="w1")
    with pytest.raises(grpc.RpcError) as refused:
        alice.WriteInput(_chunks(without, b"x", eof=True), timeout=60)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "-i" in refused.value.details()

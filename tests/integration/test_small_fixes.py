"""Small findings of issue 11 through the real server: stop --grace 0 and escalation, an
argument over the kernel's MAX_ARG_STRLEN, and a request too large for authentication."""

from __future__ import annotations

import signal

import grpc
import pytest

from jobworker.v1 import jobworker_pb2 as pb
from tests.serverfixtures import RPC_TIMEOUT_S, RunningServer, output_of, start_job

T = RPC_TIMEOUT_S


@pytest.mark.parametrize("grace", [0.0, 1.0])
def test_stop_reports_no_escalation_when_sigterm_was_enough(
    api_server: RunningServer, grace: float
) -> None:
    alice = api_server.stub("alice")
    job_id = start_job(alice, "sleep", "600")
    reply = alice.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=grace), timeout=T)
    assert reply.success and not reply.escalated
    status = alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T)
    assert (status.signal, status.escalated) == (signal.SIGTERM, False)


def test_stop_grace_zero_escalates_when_sigterm_is_ignored(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    job_id = start_job(alice, "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done")
    next(iter(alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=T)))  # trap is set
    reply = alice.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=0), timeout=T)
    assert reply.escalated
    status = alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T)
    assert (status.signal, status.escalated) == (signal.SIGKILL, True)


def test_an_argument_the_kernel_would_refuse_is_invalid(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    count = 'printf %s "$1" | wc -c'
    largest = "x" * (128 * 1024 - 1)  # MAX_ARG_STRLEN, less the terminating NUL
    job_id = start_job(alice, "sh", "-c", count, "sh", largest)
    assert output_of(alice, job_id) == [("stdout", b"131071\n")]
    for field in ({"args": ["-c", count, "sh", largest + "x"]}, {"env": {"BIG": largest}}):
        with pytest.raises(grpc.RpcError) as refused:
            alice.StartJob(pb.StartJobRequest(command="sh", **field), timeout=T)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 131071 bytes in one argument" in refused.value.details()


def test_a_request_over_4_mib_is_refused_before_authorization(api_server: RunningServer) -> None:
    # grpc enforces its receive limit before any handler runs: a caller that may do
    # nothing learns only that the message is too large (docs/api.md, "Order of checks").
    mallory = api_server.stub("mallory")
    huge = pb.StartJobRequest(command="true", args=["x" * (5 * 1024 * 1024)])
    with pytest.raises(grpc.RpcError) as too_large:
        mallory.StartJob(huge, timeout=T)
    assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as denied:
        mallory.StartJob(pb.StartJobRequest(command="true"), timeout=T)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

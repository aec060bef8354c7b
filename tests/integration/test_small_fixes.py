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

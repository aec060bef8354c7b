"""Many clients, one server: a per-client quota of running jobs, and retention that
evicts the flooder's own history first. Real mTLS, real processes."""

from __future__ import annotations

import grpc
import pytest

from jobworker.api.pki import PkiPaths
from jobworker.v1 import jobworker_pb2 as pb
from tests.serverfixtures import RPC_TIMEOUT_S, running_server, start_job, wait_exited

T = RPC_TIMEOUT_S


def test_one_client_cannot_take_every_running_slot(api_pki: PkiPaths) -> None:
    with running_server(api_pki, max_running=3, max_running_per_client=2) as server:
        alice, bob, root = server.stub("alice"), server.stub("bob"), server.stub("root")
        first = [start_job(alice, "sleep", "600") for _ in range(2)]
        with pytest.raises(grpc.RpcError) as refused:
            start_job(alice, "sleep", "600")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = refused.value.details()
        assert "alice has 2 jobs" in message and "--max-jobs-per-client 2" in message
        # Another client still gets a slot; then the global bound applies to everyone.
        start_job(bob, "sleep", "600")
        with pytest.raises(grpc.RpcError) as full:
            start_job(root, "sleep", "600")
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "most this server allows (3)" in full.value.details()
        # A stopped job gives its owner's slot back.
        alice.StopJob(pb.JobRequest(job_id=first[0], grace_seconds=0), timeout=T)
        start_job(alice, "true")


def test_admins_count_against_their_own_quota(api_pki: PkiPaths) -> None:
    with running_server(api_pki, max_running_per_client=1) as server:
        root = server.stub("root")
        start_job(root, "sleep", "600")
        with pytest.raises(grpc.RpcError) as refused:
            start_job(root, "sleep", "600")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "root has 1 jobs" in refused.value.details()


def test_a_flood_of_finished_jobs_evicts_only_the_flooders_history(api_pki: PkiPaths) -> None:
    with running_server(api_pki, retain_finished=5) as server:
        alice, bob = server.stub("alice"), server.stub("bob")
        bobs = start_job(bob, "echo", "keep me")
        wait_exited(bob, bobs)
        floods = []
        for _ in range(12):
            floods.append(start_job(alice, "true"))
            wait_exited(alice, floods[-1])
        status = bob.GetStatus(pb.JobRequest(job_id=bobs), timeout=T)
        assert status.job_id == bobs
        chunks = bob.StreamOutput(pb.JobRequest(job_id=bobs), timeout=T)
        assert b"".join(c.data for c in chunks) == b"keep me\n"
        # Alice keeps her newest four (five in all with bob's); her oldest are gone.
        for job_id in floods[-4:]:
            alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T)
        with pytest.raises(grpc.RpcError) as gone:
            alice.GetStatus(pb.JobRequest(job_id=floods[-5]), timeout=T)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND

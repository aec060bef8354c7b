"""ListJobs: filtered by state and owner, a page at a time, over real mTLS."""

from __future__ import annotations

import grpc
import pytest

from jobworker.v1 import jobworker_pb2 as pb
from tests.serverfixtures import RPC_TIMEOUT_S, RunningServer, start_job, wait_exited

T = RPC_TIMEOUT_S


def all_pages(stub: object, **fields: object) -> list[list[pb.JobStatusResponse]]:
    pages: list[list[pb.JobStatusResponse]] = []
    token = ""
    while True:
        reply = stub.ListJobs(pb.ListJobsRequest(page_token=token, **fields), timeout=T)  # type: ignore[attr-defined]
        pages.append(list(reply.jobs))
        token = reply.next_page_token
        if not token:
            return pages


def test_pages_hold_every_job_once_oldest_first(api_server: RunningServer) -> None:
    stub = api_server.stub("alice")
    mine = [start_job(stub, "true") for _ in range(5)]
    for job_id in mine:
        wait_exited(stub, job_id)
    pages = all_pages(stub, page_size=2)
    assert all(len(page) <= 2 for page in pages)
    ids = [job.job_id for page in pages for job in page]
    assert len(ids) == len(set(ids))
    assert [i for i in ids if i in mine] == mine
    started = [job.started_at for page in pages for job in page]
    assert started == sorted(started)


def test_state_and_owner_filters(api_server: RunningServer) -> None:
    alice, root = api_server.stub("alice"), api_server.stub("root")
    done = start_job(alice, "true")
    wait_exited(alice, done)
    running = start_job(alice, "sleep", "30")
    theirs = start_job(root, "sleep", "30")
    try:
        listed = [j.job_id for j in alice.ListJobs(pb.ListJobsRequest(state="running")).jobs]
        assert running in listed and done not in listed and theirs not in listed
        exited = [j.job_id for j in alice.ListJobs(pb.ListJobsRequest(state="exited")).jobs]
        assert done in exited and running not in exited
        by_alice = root.ListJobs(pb.ListJobsRequest(owner="alice"), timeout=T).jobs
        assert {j.owner for j in by_alice} == {"alice"}
        assert running in [j.job_id for j in by_alice]
        assert alice.ListJobs(pb.ListJobsRequest(owner="root"), timeout=T).jobs == []
    finally:
        for stub, job_id in ((alice, running), (root, theirs)):
            stub.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=0), timeout=T)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.ListJobsRequest(state="done"), "state 'done' is not one of running, exited"),
        (pb.ListJobsRequest(page_token="garbage"), "page_token 'garbage' is not one this"),
    ],
)
def test_bad_filters_are_invalid_argument(
    api_server: RunningServer, request_: pb.ListJobsRequest, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        api_server.stub("alice").ListJobs(request_, timeout=T)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()

"""A front that answers before its nodes exist, finds nodes that join later, and spreads
short jobs over them (on a cluster of this module's own: a head, then nodes added)."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import grpc
import pytest

from jobworker.v1 import jobworker_pb2 as pb
from tests.ray_cluster.cluster import LocalCluster, local_cluster
from tests.ray_cluster.conftest import FAST_HEALTH_CHECK, GIB, RayToken, StartFront
from tests.serverfixtures import output_of, start_job, wait_exited

LATE_NODES = [{"name": f"late{i}", "num_cpus": 1, "memory": GIB} for i in range(1, 5)]


@pytest.fixture(scope="module")
def bare_cluster(
    tmp_path_factory: pytest.TempPathFactory, ray_token: RayToken
) -> Iterator[LocalCluster]:
    """A head that takes no unpinned job, and no worker node until a test adds one."""
    log_path = tmp_path_factory.mktemp("bare-ray") / "cluster.log"
    head = [{"name": "lonehead", "num_cpus": 0, "memory": GIB}]
    with local_cluster(head, log_path, env={**FAST_HEALTH_CHECK, **ray_token.env}) as cluster:
        yield cluster


def test_a_front_started_before_its_nodes_answers_then_runs_on_a_node_that_joins(
    bare_cluster: LocalCluster, start_front: StartFront
) -> None:
    front = start_front(ray_address=bare_cluster.address, discovered=False)
    alice = front.stub("alice")
    assert list(alice.ListJobs(pb.ListJobsRequest(), timeout=10).jobs) == []
    # No node takes unpinned jobs yet: the start waits a bounded time, then is told to retry.
    with pytest.raises(grpc.RpcError) as refused:
        alice.StartJob(pb.StartJobRequest(command="true"), timeout=60)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "retry" in refused.value.details()

    bare_cluster.add_node(LATE_NODES[0])
    # The start wakes discovery, which finds the new node without a restart.
    job_id = start_job(alice, "sh", "-c", "echo late")
    final = wait_exited(alice, job_id)
    assert (final.node, final.reason, final.exit_code) == ("late1", "exited", 0)
    assert output_of(alice, job_id) == [("stdout", b"late\n")]
    assert '"node_joined"' in front.log() and '"late1"' in front.log()


def test_100_short_jobs_spread_over_4_nodes_none_above_twice_its_share(
    bare_cluster: LocalCluster, start_front: StartFront
) -> None:
    for node in LATE_NODES:
        if node["name"] not in bare_cluster.node_ids:
            bare_cluster.add_node(node)
    front = start_front(ray_address=bare_cluster.address)
    alice = front.stub("alice")
    jobs = [start_job(alice, "true") for _ in range(100)]
    placed = collections.Counter(wait_exited(alice, j).node for j in jobs)
    assert set(placed) == {n["name"] for n in LATE_NODES}, placed
    assert max(placed.values()) <= 2 * 100 // len(LATE_NODES), placed

"""A front that answers before its nodes exist, finds nodes that join later (also once its
looks have slowed down on a cluster that stayed the same), and spreads short jobs over
them (on a cluster of this module's own: a head, then nodes added)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from jobworker.backends.ray.discovery import DISCOVER_MAX_SECONDS, DISCOVER_SECONDS
from jobworker.backends.ray.nodes import HEARTBEAT_DEADLINE
from jobworker.v1 import jobworker_pb2 as pb
from tests.ray_cluster.cluster import LocalCluster, local_cluster
from tests.ray_cluster.conftest import FAST_HEALTH_CHECK, GIB, Front, RayToken, StartFront
from tests.ray_cluster.test_cluster import agent_pid, status, stop
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


def grow(cluster: LocalCluster, count: int) -> None:
    """Add late nodes until the cluster has ``count`` of them."""
    for node in LATE_NODES[:count]:
        if node["name"] not in cluster.node_ids:
            cluster.add_node(node)


def test_100_short_jobs_spread_over_4_nodes_none_above_twice_its_share(
    bare_cluster: LocalCluster, start_front: StartFront
) -> None:
    grow(bare_cluster, len(LATE_NODES))
    front = start_front(ray_address=bare_cluster.address)
    alice = front.stub("alice")
    jobs = [start_job(alice, "true") for _ in range(100)]
    placed = collections.Counter(wait_exited(alice, j).node for j in jobs)
    assert set(placed) == {n["name"] for n in LATE_NODES}, placed
    assert max(placed.values()) <= 2 * 100 // len(LATE_NODES), placed


def test_a_node_whose_agent_stops_answering_takes_no_new_job_until_it_answers_again(
    bare_cluster: LocalCluster, start_front: StartFront
) -> None:
    grow(bare_cluster, 2)
    front = start_front(ray_address=bare_cluster.address)
    alice = front.stub("alice")
    probe = start_job(alice, "sleep", "300", node="late1")
    agent = agent_pid(status(alice, probe).pid)
    os.kill(agent, signal.SIGSTOP)  # alive to Ray, silent to the front: a dying node
    try:
        time.sleep(HEARTBEAT_DEADLINE + 1)  # the deadline is what this test is about
        with pytest.raises(grpc.RpcError) as refused:
            alice.StartJob(pb.StartJobRequest(command="true", node="late1"), timeout=60)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "missed its heartbeat" in refused.value.details()
        # Unpinned starts go elsewhere (one sent to the stopped agent would not answer).
        elsewhere = [start_job(alice, "true") for _ in range(5)]
        assert {status(alice, j).node for j in elsewhere} <= {"late2", "late3", "late4"}
    finally:
        os.kill(agent, signal.SIGCONT)
    # Answering again, it takes jobs again (its next poll answers within a second).
    deadline = time.monotonic() + 30
    while True:
        try:
            again = start_job(alice, "true", node="late1")
            break
        except grpc.RpcError as err:
            if err.code() is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
    assert wait_exited(alice, again).node == "late1"
    stop(alice, probe)


def _joined(front: Front, name: str) -> bool:
    for line in front.log().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "node_joined" and record.get("node") == name:
                return True
    return False


def test_a_node_that_joins_a_quiet_cluster_is_found_within_the_longest_pause(
    bare_cluster: LocalCluster, start_front: StartFront
) -> None:
    grow(bare_cluster, 1)
    front = start_front(ray_address=bare_cluster.address)
    # Nothing changes and nothing asks: the pauses between looks double to the longest
    # (5, 10, 20, then 30 s).
    pause, quiet = DISCOVER_SECONDS, 0.0
    while pause < DISCOVER_MAX_SECONDS:
        quiet, pause = quiet + pause, pause * 2
    time.sleep(quiet + 1)
    bare_cluster.add_node({"name": "late5", "num_cpus": 1, "memory": GIB})
    added = time.monotonic()
    # Found by a look (no start wakes discovery here), within the longest pause; the
    # slack is the greeting on a busy machine.
    while not _joined(front, "late5"):
        assert time.monotonic() - added < DISCOVER_MAX_SECONDS + 15, "late5 not found"
        time.sleep(0.2)
    alice = front.stub("alice")
    assert wait_exited(alice, start_job(alice, "true", node="late5")).node == "late5"

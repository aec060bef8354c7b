"""A lost node: its jobs die on it at once (the agent's guard), then the front says
``node_lost`` and gives the client's quota back; the node can come back under its name."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from pathlib import Path

import attrs
import grpc
import pytest

from jobworker.backends.ray.front import USAGE_LIST_TIMEOUT
from jobworker.backends.ray.tree import descendants
from jobworker.v1 import jobworker_pb2 as pb
from tests.ray_cluster.cluster import LocalCluster
from tests.ray_cluster.conftest import NODES, Front, StartFront
from tests.ray_cluster.test_cluster import agent_pid, alive, status, stop, usage, wait_for
from tests.serverfixtures import output_of, start_job, wait_exited

#: docs/cluster.md: a job's processes are gone this soon after its node's raylet died.
KILL_BOUND_S = 5.0


def test_a_killed_raylets_jobs_die_at_once_then_node_lost_frees_the_quota(
    start_front: StartFront, ray_cluster: LocalCluster, started_fronts: list[Front]
) -> None:
    front = start_front("--max-jobs-per-client", "2")
    alice = front.stub("alice")
    doomed = start_job(alice, "sh", "-c", "setsid sleep 300 & echo started; sleep 300", node="w3")
    spared = start_job(alice, "sleep", "300", node="w1")
    assert next(iter(alice.StreamOutput(pb.JobRequest(job_id=doomed), timeout=10))).data
    first = status(alice, doomed).pid
    tree = [first, *descendants(first)]
    try:
        assert len(tree) >= 3, tree  # the job's init, sh, the setsid sleep, the other sleep
        with pytest.raises(grpc.RpcError) as full:
            start_job(alice, "true", node="w1")
        assert full.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-jobs-per-client 2" in full.value.details()
        # Its usage, asked before the loss, is what the front can still answer after it.
        wait_for(lambda: usage(alice, doomed).samples, 10, "a usage sample of the doomed job")
        before = usage(alice, doomed).samples

        ray_cluster.kill_raylet("w3")
        wait_for(lambda: not any(alive(p) for p in tree), KILL_BOUND_S, "the job's processes gone")
        # Usage of every node at once: the lost one is left out, and the answer is not
        # held up longer than USAGE_LIST_TIMEOUT by it.
        started = time.monotonic()
        listed = alice.ListUsage(pb.ListUsageRequest(last=2), timeout=30).jobs
        assert time.monotonic() - started < USAGE_LIST_TIMEOUT + 3
        assert spared in {u.job_id for u in listed}
        wait_for(lambda: status(alice, doomed).status == "exited", 30, "node_lost")
        lost = status(alice, doomed)
        assert (lost.reason, lost.exit_code, lost.node) == ("node_lost", -1, "w3")
        assert status(alice, spared).status == "running"
        # The quota counted the lost job until then; now it is free again.
        wait_exited(alice, start_job(alice, "true", node="w1"))
        with pytest.raises(grpc.RpcError) as gone:
            output_of(alice, doomed)
        assert gone.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "lost" in gone.value.details()
        kept = usage(alice, doomed).samples
        assert kept and kept[0] == before[0] and kept[-1].time >= before[-1].time

        # Its end is recorded once, by the first front server that reported it.
        def reasons() -> list[object]:
            records = [r for f in started_fronts for r in f.audit() if r.get("job_id") == doomed]
            return [r["reason"] for r in records if r["audit"] == "job_exited"]

        wait_for(reasons, 10, "the job_exited record")
        assert reasons() == ["node_lost"]

        ray_cluster.add_node(next(n for n in NODES if n["name"] == "w3"))
        back = start_job(alice, "true", node="w3")
        assert wait_exited(alice, back).node == "w3"
        # What Ray told the front about the loss is in its JSON log, as events of its own.
        assert '"ray_error_reported"' in front.log()
        assert front.foreign_lines() == []
    finally:
        for pid in tree:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if status(alice, spared).status == "running":
            stop(alice, spared)


def _guard_of(agent: int) -> int:
    """The pid of ``agent``'s guard (jobworker/backends/ray/guard.py)."""
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"jobworker.backends.ray.guard" in argv and str(agent).encode() in argv:
            return int(entry)
    pytest.fail(f"agent {agent} has no guard")


def test_jobs_an_agent_left_without_its_guard_are_swept_by_the_next_agent(
    front: Front, ray_cluster: LocalCluster
) -> None:
    alice = front.stub("alice")
    job_id = start_job(alice, "sleep", "300", node="w3")
    first = status(alice, job_id).pid
    try:
        agent = agent_pid(first)
        os.kill(_guard_of(agent), signal.SIGKILL)
        os.kill(agent, signal.SIGKILL)
        # Ray reports the agent dead: the front gives up on the node's jobs at once...
        wait_for(lambda: status(alice, job_id).reason == "node_lost", 30, "node_lost")
        # ... but with the guard gone nobody killed the job (the gap the guard closes),
        assert alive(first)
        # until the front's discovery starts the node's next agent, which sweeps it.
        wait_for(lambda: not alive(first), 30, "the next agent's sweep")
        assert wait_exited(alice, start_job(alice, "true", node="w3")).node == "w3"
    finally:
        if alive(first):
            os.kill(first, signal.SIGKILL)


@attrs.frozen
class _Start:
    sent_at: float
    #: The job id if answered OK, else the refusal's code.
    job_id: str | None
    code: grpc.StatusCode | None = None


def test_starts_in_flight_as_a_raylet_dies_are_refused_or_moved_never_ok_then_lost(
    start_front: StartFront, ray_cluster: LocalCluster
) -> None:
    """Several clients start jobs (pinned to w3, or anywhere) while w3's raylet is killed:
    every start w3 answered OK began before its raylet died; the others were moved to
    another node or refused with a retry. The agent's guard is held stopped meanwhile (a
    busy machine: the agent outlives its raylet for a while), so that it is the agent's
    own check that refuses."""
    front = start_front("--no-isolation")
    stop_at: list[float] = []  # set once the raylet is dead: the clients go on 3 s more
    starts: list[_Start] = []

    def client(node: str | None) -> None:
        stub = front.stub("alice")
        while not stop_at or time.monotonic() < stop_at[0]:
            sent_at = time.time()
            try:
                job_id = start_job(stub, "sleep", "20", **({"node": node} if node else {}))
                starts.append(_Start(sent_at, job_id))
            except grpc.RpcError as err:
                starts.append(_Start(sent_at, None, err.code()))
            time.sleep(0.05)

    probe = start_job(front.stub("alice"), "sleep", "20", node="w3")
    guard = _guard_of(agent_pid(status(front.stub("alice"), probe).pid))
    os.kill(guard, signal.SIGSTOP)
    raylet = os.pidfd_open(ray_cluster.raylets["w3"])
    clients = [threading.Thread(target=client, args=(node,)) for node in ("w3", None, None, None)]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: any(s.job_id for s in starts), 30, "a first job started")
        time.sleep(1.0)
        ray_cluster.kill_raylet("w3")
        assert select.select([raylet], [], [], 10)[0], "the raylet did not exit"
        died_at = time.time()
        stop_at.append(time.monotonic() + 3.0)
    finally:
        stop_at.append(0.0)
        for thread in clients:
            thread.join(60)
        os.close(raylet)
        os.kill(guard, signal.SIGCONT)  # it kills the node's jobs and its agent now
    alice = front.stub("alice")
    after = [s for s in starts if s.sent_at > died_at]
    assert after, "no start was sent after the raylet died"
    refused = {s.code for s in starts if s.job_id is None}
    assert refused <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION,
                       grpc.StatusCode.INVALID_ARGUMENT}, refused  # fmt: skip
    on_w3 = []
    for start in starts:
        if start.job_id is not None:
            shown = status(alice, start.job_id)
            if shown.node == "w3":
                on_w3.append(shown)
    assert on_w3, "no job ran on w3 before its raylet died"
    late = [(s.job_id, s.started_at - died_at) for s in on_w3 if s.started_at >= died_at]
    assert not late, f"started on w3 after its raylet died, answered OK: {late}"
    # Unpinned starts after the loss went elsewhere (the node is suspect at once).
    assert any(s.job_id for s in after), "every start after the raylet died was refused"
    for shown in on_w3:
        wait_for(lambda j=shown.job_id: status(alice, j).status == "exited", 30, "node_lost")
    ray_cluster.add_node(next(n for n in NODES if n["name"] == "w3"))

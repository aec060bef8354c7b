"""What an agent's long poll carries: only what changed (a start, output that grew, an end),
nothing for a job that only runs, and what a front shows of it (a second driver polls the
agent of a real node directly, beside the front's own poll)."""

from __future__ import annotations

import json
import subprocess
import sys

from jobworker.backends.ray.agent import OUTPUT_TICK
from tests.ray_cluster.cluster import LocalCluster
from tests.ray_cluster.conftest import Front, MakeServe
from tests.ray_cluster.test_cluster import status, stop, wait_for
from tests.serverfixtures import start_job

#: A driver of its own: the agent's polls, as a front makes them, printed one JSON line each.
_POLLER = """
import json, sys, time
import ray
from jobworker.backends.ray.agent import NAMESPACE, agent_name
address, node_id, wait = sys.argv[1], sys.argv[2], float(sys.argv[3])
ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
agent = ray.get_actor(agent_name(node_id), namespace=NAMESPACE)
since = ray.get(agent.poll.remote(-1, 0)).version
for line in sys.stdin:
    began = time.monotonic()
    reply = ray.get(agent.poll.remote(since, wait))
    since = reply.version
    print(json.dumps({"took": time.monotonic() - began, "evicted": reply.evicted,
                      "jobs": {s.job_id: s.output_bytes for s in reply.jobs}}), flush=True)
"""
WAIT_S = 3.0


def test_a_poll_carries_only_the_jobs_that_changed_and_an_idle_one_nothing(
    front: Front, ray_cluster: LocalCluster, serve_command: MakeServe
) -> None:
    alice = front.stub("alice")
    quiet = start_job(alice, "sleep", "300", node="w2")
    env = serve_command().env
    poller = subprocess.Popen(
        [sys.executable, "-c", _POLLER, ray_cluster.address, ray_cluster.node_ids["w2"],
         str(WAIT_S)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert poller.stdin is not None and poller.stdout is not None

    def poll() -> dict[str, object]:
        assert poller.stdin is not None and poller.stdout is not None
        poller.stdin.write("poll\n")
        poller.stdin.flush()
        line = poller.stdout.readline()
        assert line, "the poller ended"
        reply: dict[str, object] = json.loads(line)
        return reply

    chatty = None
    try:
        # A running job that writes nothing is no change: the poll waits it out, empty.
        idle = poll()
        assert idle["jobs"] == {} and idle["evicted"] == []
        assert float(idle["took"]) > WAIT_S - 0.5  # type: ignore[arg-type]
        # A start is a change, and so is output growing: only that job is reported.
        chatty = start_job(alice, "sh", "-c", "while :; do echo x; sleep 0.1; done", node="w2")
        seen: dict[str, int] = {}
        while seen.get(chatty, 0) == 0:
            reply = poll()
            jobs = reply["jobs"]
            assert isinstance(jobs, dict)
            assert set(jobs) == {chatty}, reply
            assert float(reply["took"]) < OUTPUT_TICK + 1.5, reply  # type: ignore[arg-type]
            seen.update(jobs)
        # The front hears the same changes: the job's byte count grows in its status.
        counted = status(alice, chatty).output_bytes
        wait_for(lambda: status(alice, chatty).output_bytes > counted, 10, "output_bytes grows")
        stop(alice, chatty)
        while True:
            jobs = poll()["jobs"]
            assert isinstance(jobs, dict) and quiet not in jobs
            if not jobs:
                break  # the end reported, the node quiet again
        assert status(alice, quiet).status == "running"
        assert front.foreign_lines() == []  # Ray's own lines are JSON events too
    finally:
        poller.stdin.close()
        poller.wait(30)
        poller.stdout.close()
        stop(alice, quiet)
        if chatty is not None and status(alice, chatty).status == "running":
            stop(alice, chatty)

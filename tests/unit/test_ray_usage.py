"""The Ray front's usage relay with fake agents (no cluster): which node is asked, the
bound on ListUsage, and what a lost node's job answers (tests/ray_cluster: a real one)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest

pytest.importorskip("ray")

from jobworker.backends.ray import front
from jobworker.backends.ray.agent import AgentConfig
from jobworker.backends.ray.nodes import Node
from jobworker.errors import FailedPrecondition
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.model import ExitInfo, JobState, JobStatus, TerminationReason
from jobworker.usage import JobUsage, UsageSample


class _Method:
    def __init__(self, impl: Callable[..., Awaitable[Any]]) -> None:
        self._impl = impl

    def remote(self, *args: Any) -> Awaitable[Any]:
        return self._impl(*args)


class FakeAgent:
    """Answers as a node agent would, for the jobs in ``samples``; ``delay`` stalls it."""

    def __init__(self, samples: dict[str, list[UsageSample]], delay: float = 0.0) -> None:
        self.samples = samples
        self.delay = delay
        self.usage = _Method(self._usage)
        self.running_usage = _Method(self._running_usage)

    async def _usage(self, job_id: str, last: int) -> JobUsage:
        await asyncio.sleep(self.delay)
        found = self.samples[job_id]
        return JobUsage(job_id, "proc", tuple(found[-last:] if last else found))

    async def _running_usage(self, last: int) -> list[JobUsage]:
        return [await self._usage(job_id, last) for job_id in self.samples]


def _status(job_id: str, node: str) -> JobStatus:
    return JobStatus(
        job_id, JobSpec("sleep"), "alice", JobState.RUNNING, 1, time.time(), "x", node=node
    )


def _backend(agents: dict[str, FakeAgent]) -> tuple[front.RayBackend, dict[str, Node]]:
    backend = front.RayBackend(Plugins(), AgentConfig(node_name=""))
    nodes = {}
    for name, agent in agents.items():
        node = nodes[name] = Node(name, name, agent, {})
        backend._nodes[name] = node
        for job_id in agent.samples:
            backend._table.add(_status(job_id, name), node)
    return backend, nodes


def _samples(n: int) -> list[UsageSample]:
    return [UsageSample(100.0 + i, 1000 * i, 1 << 20, 1) for i in range(n)]


def test_usage_comes_from_the_jobs_node_and_a_slow_node_is_left_out_of_the_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(front, "USAGE_LIST_TIMEOUT", 0.2)
    backend, _ = _backend(
        {"w1": FakeAgent({"a": _samples(3)}), "w2": FakeAgent({"b": _samples(2)}, delay=60)}
    )

    async def scenario() -> tuple[JobUsage, list[JobUsage], float]:
        one = await backend.usage("a", last=2)
        began = time.monotonic()
        listed = await backend.running_usage(last=1)
        return one, listed, time.monotonic() - began

    one, listed, took = asyncio.run(scenario())
    assert (one.job_id, one.samples) == ("a", tuple(_samples(3)[-2:]))
    assert [(u.job_id, len(u.samples)) for u in listed] == [("a", 1)]
    assert took < 5


def test_a_lost_nodes_job_answers_the_samples_relayed_before_else_failed_precondition() -> None:
    agent = FakeAgent({"seen": _samples(3), "ended": _samples(3)})
    backend, nodes = _backend({"w3": agent})

    async def scenario() -> tuple[JobUsage, JobUsage]:
        await backend.usage("seen", last=2)
        agent.samples["seen"] = _samples(5)
        await backend.running_usage(last=1)  # top's ask: the newest sample, kept on
        # A job that ends on a live node: its agent keeps the samples, the front drops its.
        ended = backend._table.lookup("ended")
        assert ended.usage is not None
        exit = ExitInfo(reason=TerminationReason.EXITED, exit_code=0)
        backend._table.update(ended, attrs.evolve(ended.status, state=JobState.EXITED, exit=exit))
        assert ended.usage is None
        # A job started since the last ask: the front relayed none of its samples.
        backend._table.add(_status("unseen", "w3"), nodes["w3"])
        backend._table.lose(nodes["w3"], "test")
        return await backend.usage("seen"), await backend.usage("seen", last=1)

    every, newest = asyncio.run(scenario())
    assert [s.time for s in every.samples] == [101.0, 102.0, 104.0]
    assert [s.time for s in newest.samples] == [104.0]
    with pytest.raises(FailedPrecondition, match="node w3, which was lost"):
        asyncio.run(backend.usage("unseen"))

"""Where a job runs: a node chosen from the job's limits and ``--node`` pin.

``cpu`` and ``memory`` become a one-bundle placement group (Ray's bookkeeping: limits are
enforced on the node by its containment plugin), released by the agent when the job ends.
``spec.node`` pins the bundle to a node. An ask no node could ever hold is refused at once;
one that does not fit now is refused after ``timeout`` (Ray would leave it pending
forever). Both are RESOURCE_EXHAUSTED, naming the ask and the largest node. A job that
asks for neither goes to the least-loaded node (:meth:`.nodes.Node.load`: running jobs
plus recent starts, per CPU; counted as jobs start and end, no walk of the job table).

A node whose agent missed its heartbeat deadline (:data:`.nodes.HEARTBEAT_DEADLINE`) is
suspect: it takes no new job, pinned or not (UNAVAILABLE, retry), until it answers again.

A node with no CPU (a head started with ``--num-cpus 0``) takes a job only when it is
pinned there: Ray would put a memory-only bundle on it, so the bundle's label selector
excludes such nodes.
"""

from __future__ import annotations

import asyncio
import time

import attrs

from jobworker.backends.ray.nodes import Node, gib
from jobworker.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from jobworker.jobspec import JobSpec


class NoNode(Unavailable):
    """No known node takes the job yet: one may join (the front discovers it), so the
    client is told to retry."""


def describe_ask(ask: dict[str, float]) -> str:
    parts = []
    if "CPU" in ask:
        parts.append(f"{ask['CPU']:g} CPU")
    if "memory" in ask:
        parts.append(f"{gib(ask['memory'])} memory")
    return ", ".join(parts)


def named(name: str, nodes: list[Node]) -> list[Node]:
    """The live nodes of ``nodes`` called ``name`` (by node name or Ray node id)."""
    return [n for n in nodes if name in (n.name, n.node_id) and not n.lost]


def _takes_jobs(node: Node) -> bool:
    """Whether unpinned jobs may go to ``node``: not to one with no CPU (a head)."""
    return node.total.get("CPU", 0) > 0


@attrs.define(eq=False)
class Placer:
    """Chooses nodes among ``nodes`` (the front's live set, shared) for new jobs."""

    _nodes: dict[str, Node]
    timeout: float

    async def place(self, job_id: str, spec: JobSpec) -> tuple[Node, str | None]:
        """The node for ``spec`` and the name of the placement group holding its share."""
        now = time.monotonic()
        known = [n for n in self._nodes.values() if not n.lost]
        if spec.node is not None and not named(spec.node, known):
            names = ", ".join(sorted(n.name for n in known)) or "none"
            raise InvalidArgument(f"no node named {spec.node!r}; nodes: {names}")
        live = [n for n in known if not n.suspect(now)]
        if spec.node is not None:
            nodes = named(spec.node, live)
            if not nodes:
                raise NoNode(
                    f"node {spec.node} missed its heartbeat (it may be dying): it takes no"
                    " new job; retry in a few seconds"
                )
        else:
            nodes = [n for n in live if _takes_jobs(n)]
            if live and not nodes:
                names = ", ".join(sorted(n.name for n in live))
                raise NoNode(
                    f"no node takes unpinned jobs yet (none has a CPU: {names});"
                    " retry once a worker node has joined, or pin one with --node"
                )
        if not nodes:
            raise NoNode("no node of the Ray cluster is available yet; retry in a few seconds")
        ask: dict[str, float] = {}
        if spec.limits.cpu:
            ask["CPU"] = spec.limits.cpu
        if spec.limits.memory:
            ask["memory"] = float(spec.limits.memory)
        if not ask:
            node = min(nodes, key=lambda n: (n.load(now), -n.total.get("CPU", 0)))
            node.placed(now)
            return node, None
        largest = max(self._nodes.values(), key=lambda n: (n.total.get("CPU", 0),
                                                           n.total.get("memory", 0)))  # fmt: skip
        fits = [n for n in nodes if all(n.total.get(k, 0) >= v for k, v in ask.items())]
        if not fits:
            where = f"node {nodes[0].name}" if spec.node else "any node"
            raise ResourceExhausted(
                f"{describe_ask(ask)} asked for, more than {where} has:"
                f" the largest node is {largest.describe()}"
            )
        selector: str | None = None
        if spec.node is not None:
            selector = fits[0].node_id
        else:
            idle = [n.node_id for n in known if not _takes_jobs(n) or n.suspect(now)]
            if idle:
                selector = f"!in({', '.join(idle)})"
        return await self._reserve(job_id, ask, fits, selector)

    async def _reserve(
        self, job_id: str, ask: dict[str, float], fits: list[Node], node_ids: str | None
    ) -> tuple[Node, str]:
        """Hold ``ask`` in a placement group, on a node whose id matches ``node_ids`` (a
        Ray label selector value) if given."""
        from ray.util import placement_group, placement_group_table, remove_placement_group

        name = f"jobworker-{job_id}"
        selector = None if node_ids is None else [{"ray.io/node-id": node_ids}]
        group = placement_group(
            [ask], strategy="STRICT_PACK", name=name, lifetime="detached",
            bundle_label_selector=selector,
        )  # fmt: skip
        try:
            await asyncio.wait_for(group.ready(), self.timeout)
        except TimeoutError:
            remove_placement_group(group)
            free = ", ".join(n.describe() for n in fits)
            raise ResourceExhausted(
                f"{describe_ask(ask)} asked for: no node that could hold it ({free}) has it"
                f" free now (waited {self.timeout:g} s); retry later"
            ) from None
        except BaseException:
            remove_placement_group(group)
            raise
        table = await asyncio.to_thread(placement_group_table, group)
        node_id = table["bundles_to_node_id"][0]
        node = self._nodes.get(node_id)
        if node is None:
            remove_placement_group(group)
            raise FailedPrecondition("the node chosen for the job has no agent yet; retry")
        node.placed(time.monotonic())
        return node, name

"""Where a job runs: a node chosen from the job's limits and ``--node`` pin.

``cpu`` and ``memory`` become a one-bundle placement group (Ray's bookkeeping: limits are
enforced on the node by its containment plugin), released by the agent when the job ends.
``spec.node`` pins the bundle to a node. An ask no node could ever hold is refused at once;
one that does not fit now is refused after ``timeout`` (Ray would leave it pending
forever). Both are RESOURCE_EXHAUSTED, naming the ask and the largest node. A job that
asks for neither goes to the node with the fewest running jobs.
"""

from __future__ import annotations

import asyncio

import attrs

from jobworker.backends.ray.nodes import Node, gib
from jobworker.backends.ray.table import JobTable
from jobworker.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from jobworker.jobspec import JobSpec


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


@attrs.define(eq=False)
class Placer:
    """Chooses nodes among ``nodes`` (the front's live set, shared) for new jobs."""

    _nodes: dict[str, Node]
    _table: JobTable
    timeout: float

    async def place(self, job_id: str, spec: JobSpec) -> tuple[Node, str | None]:
        """The node for ``spec`` and the name of the placement group holding its share."""
        nodes = [n for n in self._nodes.values() if not n.lost]
        if spec.node is not None:
            pinned = named(spec.node, nodes)
            if not pinned:
                names = ", ".join(sorted(n.name for n in nodes)) or "none"
                raise InvalidArgument(f"no node named {spec.node!r}; nodes: {names}")
            nodes = pinned
        if not nodes:
            raise FailedPrecondition("no node of the Ray cluster is available; retry later")
        ask: dict[str, float] = {}
        if spec.limits.cpu:
            ask["CPU"] = spec.limits.cpu
        if spec.limits.memory:
            ask["memory"] = float(spec.limits.memory)
        if not ask:
            load = self._table.load(nodes)
            return min(nodes, key=lambda n: (load[n.node_id], -n.total.get("CPU", 0))), None
        largest = max(self._nodes.values(), key=lambda n: (n.total.get("CPU", 0),
                                                           n.total.get("memory", 0)))  # fmt: skip
        fits = [n for n in nodes if all(n.total.get(k, 0) >= v for k, v in ask.items())]
        if not fits:
            where = f"node {nodes[0].name}" if spec.node else "any node"
            raise ResourceExhausted(
                f"{describe_ask(ask)} asked for, more than {where} has:"
                f" the largest node is {largest.describe()}"
            )
        return await self._reserve(job_id, ask, fits, pinned=spec.node is not None)

    async def _reserve(
        self, job_id: str, ask: dict[str, float], fits: list[Node], pinned: bool
    ) -> tuple[Node, str]:
        from ray.util import placement_group, placement_group_table, remove_placement_group

        name = f"jobworker-{job_id}"
        selector = [{"ray.io/node-id": fits[0].node_id}] if pinned else None
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
        return node, name

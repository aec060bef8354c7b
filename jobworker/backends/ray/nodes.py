"""The front's view of one node and of a call to its agent.

Every call to an agent is bounded (:data:`CALL_TIMEOUT`): a node that does not answer is
:class:`Unreachable` (FAILED_PRECONDITION, "retry"), while an error the agent raised on
purpose (a :class:`~jobworker.errors.JobworkerError`) reaches the caller as itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import attrs

from jobworker.errors import FailedPrecondition, JobworkerError

#: A call to an agent that takes longer than this is treated as a failed call.
CALL_TIMEOUT = 30.0

_T = TypeVar("_T")


def gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


@attrs.define(eq=False)
class Node:
    node_id: str
    name: str
    agent: Any  # a Ray actor handle
    total: dict[str, float]
    lost: bool = False
    watcher: asyncio.Task[None] | None = None

    def describe(self) -> str:
        cpu = self.total.get("CPU", 0)
        return f"{self.name} ({cpu:g} CPU, {gib(self.total.get('memory', 0))} memory)"


class Unreachable(FailedPrecondition):
    def __init__(self, node: Node, err: BaseException) -> None:
        super().__init__(f"node {node.name} is unreachable ({type(err).__name__}); retry")
        self.node = node
        self.error = err


async def call(ref: Awaitable[_T], node: Node, within: float = CALL_TIMEOUT) -> _T:
    """Await an agent call; an error the agent raised is re-raised as itself."""
    import ray

    try:
        return await asyncio.wait_for(ref, within)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause
        if isinstance(cause, JobworkerError):
            raise cause from None
        raise
    except (ray.exceptions.RayError, TimeoutError) as err:
        raise Unreachable(node, err) from err

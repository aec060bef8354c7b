"""The front's view of one node and of a call to its agent.

Every call to an agent is bounded (:data:`CALL_TIMEOUT`): a node that does not answer is
:class:`Unreachable` (FAILED_PRECONDITION, "retry"), while an error the agent raised on
purpose (a :class:`~jobworker.errors.JobworkerError`) reaches the caller as itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import attrs

from jobworker.errors import FailedPrecondition, JobworkerError

#: A call to an agent that takes longer than this is treated as a failed call.
CALL_TIMEOUT = 30.0

#: A node whose agent has not answered a poll for this long is suspect: no new job goes
#: there (its long poll answers at least every ``discovery.POLL_SECONDS`` plus
#: ``discovery.POLL_MIN_SECONDS``, 16 s, while it is well).
HEARTBEAT_DEADLINE = 20.0
#: Recent starts count in a node's load with this half-life (seconds): a burst of short
#: jobs spreads, though each ends before the next heartbeat reports it.
RECENT_HALF_LIFE = 2.0

#: Pause before retrying a failed agent call (a follower resumes from its offset).
RETRY_SECONDS = 0.5

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
    #: Its running jobs, kept by the job table as jobs start and end.
    running: int = 0
    #: When its agent last answered (monotonic seconds).
    heard_at: float = attrs.Factory(time.monotonic)
    #: Starts placed here, decayed to ``starts_at`` (see :data:`RECENT_HALF_LIFE`).
    starts: float = 0.0
    starts_at: float = 0.0

    def recent_starts(self, now: float) -> float:
        return self.starts * math.exp2((self.starts_at - now) / RECENT_HALF_LIFE)

    def placed(self, now: float) -> None:
        """Count a start placed here (before its agent answers: concurrent starts spread)."""
        self.starts, self.starts_at = self.recent_starts(now) + 1, now

    def load(self, now: float) -> float:
        """Running jobs plus recent starts, per CPU: the least loaded node takes the next
        unpinned job (a bigger node takes proportionally more)."""
        return (self.running + self.recent_starts(now)) / max(self.total.get("CPU", 0), 1.0)

    def suspect(self, now: float) -> bool:
        """Whether its agent missed the heartbeat deadline (it may be dying)."""
        return now - self.heard_at > HEARTBEAT_DEADLINE

    def distrust(self) -> None:
        """Suspect it now, until its agent answers a poll again: a call failed, or its
        agent said the node is going away."""
        self.heard_at = -math.inf

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

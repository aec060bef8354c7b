"""The cluster's one count of running jobs, shared by every front server on it.

Every front server asks the ledger -- one detached Ray actor per cluster, on the head, the
machine whose loss is the cluster's anyway -- before it starts a job: ``--max-jobs`` and
``--max-jobs-per-client`` are checked against every front's jobs, and the check and the
reservation are one step (each method runs to its end without awaiting, on the actor's one
event loop), so that two fronts racing for the last slot cannot both take it. Ray's GCS
key-value store (``ray.experimental.internal_kv``) would have been the other shared
place; it offers put-if-absent but no compare-and-set of a value, so a counter there would
need a key per slot and a scan to find a free one.

A reservation is made for a job id before the job is placed, and is

* *pending* until the front hears the agent's answer (or another front learns the job
  from its node's poll), then *held*; one left pending ``expires_in`` seconds (its front
  died before the agent's answer) lapses;
* released by the first front server that reports the job's end (:meth:`Ledger.end`),
  which is also the one that writes the job's ``job_exited`` audit record, so that each
  end is handled once however many fronts watch the node; a front that finds a job ended
  while no front watched releases it (:meth:`Ledger.adopt`), and the ledger itself
  releases the jobs of nodes Ray declared dead (:meth:`Ledger.sweep`: lost while no
  front watched).

The ledger lives in memory: if its process dies, Ray restarts it empty (``max_restarts``),
and it re-learns the jobs running then from the front servers, each of which knows every
node's running jobs from the agents' heartbeats. Each incarnation has an *epoch* (random,
made at construction); a front passes the epoch it last taught with every reservation,
and a ledger that does not recognise it answers :data:`UNTAUGHT` instead of deciding: the
front teaches it its running jobs (:meth:`Ledger.teach`, idempotent by job id, so every
front teaching once is harmless) and asks again. Starts in flight across the restart are
taken in by their :meth:`Ledger.hold`, which carries the owner, and jobs a front learns
after teaching by :meth:`Ledger.adopt`. The approximation: a front whose discovery has
not yet found every node teaches what it knows, and the rest counts as discovery finds
it, as with a front started after its jobs.

Plain class here; :func:`ledger_handle` wraps it with ``ray.remote``, and a front server
speaks to it through :class:`LedgerClient`.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import structlog

from jobworker.backends.ray.agent import NAMESPACE
from jobworker.backends.ray.nodes import CALL_TIMEOUT
from jobworker.errors import Unavailable

log = structlog.get_logger("jobworker.ray.ledger")

LEDGER_NAME = "jobworker-ledger"
#: The resource only the head node has.
HEAD_RESOURCE = "node:__internal_head__"
#: How long an ended job's id is remembered: later reports of its end (other fronts,
#: a second or so behind) are not the first.
ENDED_MEMORY_SECONDS = 600.0
#: How often the ledger looks for lost nodes whose jobs still hold slots.
SWEEP_SECONDS = 10.0
#: :meth:`Ledger.reserve`'s answer to a front that has not taught this incarnation.
UNTAUGHT: Literal["untaught"] = "untaught"


@attrs.define
class _Hold:
    owner: str
    #: The node running the job, once known (held); None while pending.
    node: str | None = None


def _dead_nodes() -> set[str]:
    """The nodes Ray declared dead (it keeps them listed), not those merely unknown: a
    node that joined after the list was taken is not dead."""
    import ray

    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call, unused-ignore]  # typed only with ray installed
    return {n["NodeID"] for n in nodes if not n["Alive"]}


class Ledger:
    """Reservations of running jobs, per owner; every method is one atomic step.

    ``dead``: the ids of the cluster's dead nodes (Ray's, by default; blocking)."""

    def __init__(self, dead: Callable[[], set[str]] = _dead_nodes) -> None:
        self._dead = dead
        self._holds: dict[str, _Hold] = {}
        self._owners: collections.Counter[str] = collections.Counter()
        #: Held jobs per node, for a node's loss.
        self._on_node: collections.defaultdict[str, set[str]] = collections.defaultdict(set)
        #: Pending reservations in the order made (their deadlines about in that order).
        self._pending: dict[str, float] = {}
        #: Ids whose end was reported, with when (oldest first).
        self._ended: dict[str, float] = {}
        #: This incarnation's (a ledger Ray restarted has another): see the module.
        self.epoch = secrets.token_hex(8)
        self._watching: asyncio.Task[None] | None = None

    async def reserve(
        self,
        job_id: str,
        owner: str,
        max_total: int,
        max_per_client: int,
        expires_in: float,
        taught: str | None,
    ) -> tuple[int, int] | Literal["untaught"] | None:
        """Reserve a slot for ``job_id``; None if reserved, else the cluster's count and
        the owner's, one of them at its limit; :data:`UNTAUGHT` if ``taught`` (the epoch
        the caller last taught) is not this incarnation's: :meth:`teach` it first."""
        if taught != self.epoch:
            return UNTAUGHT
        now = time.monotonic()
        self._lapse(now)
        total, mine = len(self._holds), self._owners[owner]
        if total >= max_total or mine >= max_per_client:
            return total, mine
        self._holds[job_id] = _Hold(owner)
        self._owners[owner] += 1
        self._pending[job_id] = now + expires_in
        return None

    async def hold(self, job_id: str, owner: str, node: str) -> None:
        """The agent of ``node`` started ``job_id``: its reservation no longer lapses (a
        start reserved before the ledger restarted is taken in)."""
        self._take(job_id, owner, node)

    async def teach(self, running: Mapping[str, tuple[str, str]]) -> str:
        """A front's running jobs (id to owner and node), all of which are held (taken in
        if unknown); the epoch to reserve with. Starts sweeping lost nodes' jobs
        (:meth:`sweep`) on the first lesson, for the incarnation's life."""
        for job_id, (owner, node) in running.items():
            self._take(job_id, owner, node)
        if self._watching is None:
            self._watching = asyncio.get_running_loop().create_task(self._watch(SWEEP_SECONDS))
        return self.epoch

    async def release(self, job_id: str) -> None:
        """The start of ``job_id`` failed: give its slot back."""
        self._drop(job_id)

    async def end(self, job_id: str) -> bool:
        """``job_id`` ended: give its slot back; whether this is the first report of it
        (its reporter writes the ``job_exited`` record)."""
        if job_id in self._ended:
            return False
        self._drop(job_id)
        self._remember(job_id)
        return True

    async def adopt(self, node: str, running: Mapping[str, str], ended: Sequence[str]) -> list[str]:
        """A front found these jobs on ``node`` (``running``: id to owner). Running ones
        are held (taken in if unknown: started before the ledger or by a front that
        died); ended ones still held are released, and returned: nobody reported their
        end (it came while no front watched), so the caller writes their record."""
        for job_id, owner in running.items():
            self._take(job_id, owner, node)
        unreported = [j for j in ended if j in self._holds]
        for job_id in unreported:
            self._drop(job_id)
            self._remember(job_id)
        return unreported

    async def sweep(self) -> list[str]:
        """Give back the slots of jobs on nodes that are gone (lost while no front server
        watched: a front that sees a loss reports each job's end); the ids dropped."""
        dead = await asyncio.to_thread(self._dead)
        gone = [node for node in self._on_node if node in dead]
        dropped = [job_id for node in gone for job_id in self._on_node[node]]
        for job_id in dropped:
            self._drop(job_id)  # not remembered: a front that saw the loss still records it
        return dropped

    async def _watch(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await self.sweep()

    async def counts(self) -> dict[str, int]:
        """Reserved slots per owner (for tests and operators)."""
        return dict(self._owners)

    def _take(self, job_id: str, owner: str, node: str) -> None:
        """Hold ``job_id``, running on ``node``: taken in if unknown and not ended."""
        if job_id not in self._holds and job_id not in self._ended:
            self._holds[job_id] = _Hold(owner)
            self._owners[owner] += 1
        hold = self._holds.get(job_id)
        if hold is not None and hold.node is None:
            hold.node = node
            self._on_node[node].add(job_id)
        self._pending.pop(job_id, None)

    def _drop(self, job_id: str) -> None:
        self._pending.pop(job_id, None)
        hold = self._holds.pop(job_id, None)
        if hold is None:
            return
        self._owners[hold.owner] -= 1
        if not self._owners[hold.owner]:
            del self._owners[hold.owner]
        if hold.node is not None:
            jobs = self._on_node[hold.node]
            jobs.discard(job_id)
            if not jobs:
                del self._on_node[hold.node]

    def _remember(self, job_id: str) -> None:
        now = time.monotonic()
        self._ended[job_id] = now
        while True:  # oldest first; ends at the one just added at the latest
            old, at = next(iter(self._ended.items()))
            if now - at < ENDED_MEMORY_SECONDS:
                return
            del self._ended[old]

    def _lapse(self, now: float) -> None:
        """Drop pending reservations past their deadline (oldest first)."""
        while self._pending:
            job_id, deadline = next(iter(self._pending.items()))
            if deadline > now:
                return
            self._drop(job_id)


def ledger_handle() -> Any:
    """The cluster's ledger actor: created on the head by the first front server that
    asks, found by name by the others. Blocking (GCS calls)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call, unused-ignore]  # typed only with ray installed
    head = next((n["NodeID"] for n in nodes if HEAD_RESOURCE in n["Resources"]), None)
    where = (
        {}
        if head is None
        else {"scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=False)}
    )
    return (
        ray.remote(Ledger)
        .options(
            name=LEDGER_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=10_000,
            **where,
        )
        .remote()
    )


#: A front's running jobs, as it teaches them (:meth:`Ledger.teach`): id to owner and node.
Lesson = Mapping[str, tuple[str, str]]


@attrs.define
class LedgerClient:
    """A front server's side of the ledger: each call answered within ``CALL_TIMEOUT``
    (else UNAVAILABLE), and the epoch this front last taught (see the module)."""

    handle: Any
    _taught: str | None = None

    @classmethod
    async def join(cls) -> LedgerClient:
        return cls(await asyncio.to_thread(ledger_handle))

    async def reserve(
        self,
        job_id: str,
        owner: str,
        limits: tuple[int, int],
        expires_in: float,
        running: Callable[[], Lesson],
    ) -> tuple[int, int] | None:
        """:meth:`Ledger.reserve` (``limits``: the cluster's and the owner's), teaching a
        ledger new to this front (or restarted empty) ``running()`` first."""
        for _ in range(2):
            answer = await self._ask(
                self.handle.reserve.remote(job_id, owner, *limits, expires_in, self._taught)
            )
            if answer != UNTAUGHT:
                refused: tuple[int, int] | None = answer
                return refused
            lesson = running()
            self._taught = await self._ask(self.handle.teach.remote(lesson))
            log.info("ray_ledger_taught", jobs=len(lesson), epoch=self._taught)
        raise Unavailable(
            "the cluster's job ledger (an actor on the Ray head) restarted during this"
            " start; retry shortly"
        )

    def hold(self, job_id: str, owner: str, node: str) -> None:
        self.handle.hold.remote(job_id, owner, node)

    def release(self, job_id: str) -> None:
        self.handle.release.remote(job_id)

    async def end(self, job_id: str) -> bool:
        first: bool = await self._ask(self.handle.end.remote(job_id))
        return first

    async def adopt(self, node: str, running: Mapping[str, str], ended: Sequence[str]) -> list[str]:
        unreported: list[str] = await self._ask(self.handle.adopt.remote(node, running, ended))
        return unreported

    async def _ask(self, ref: Any) -> Any:
        import ray

        try:
            return await asyncio.wait_for(ref, CALL_TIMEOUT)
        except (ray.exceptions.RayError, TimeoutError) as err:
            raise Unavailable(
                "the cluster's job ledger (an actor on the Ray head) does not answer"
                f" ({type(err).__name__}); retry shortly"
            ) from err

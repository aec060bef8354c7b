"""The front's picture of every node's jobs, kept from the agents' long polls.

Each agent's poll (:meth:`.agent.NodeAgent.poll`) is merged here: a job's exit is seen at
once; ``output_bytes`` of a running job may lag by up to a second (the agent's
``OUTPUT_TICK``). A job found in a
poll that the front did not start (an earlier front server did) is taken in as it is.
When a node is lost its running jobs end with ``node_lost``.

Usage: the table keeps the samples the front relayed of each running job (a
:class:`~jobworker.usage.UsageRing`), so that the usage of a job whose node is lost can
still be read up to the last sample relayed; they are dropped when the job ends on a live
node (its agent keeps its own).
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import time
from collections.abc import Callable

import attrs
import structlog

from jobworker.backends.ray.agent import PollReply
from jobworker.backends.ray.nodes import Node
from jobworker.errors import FailedPrecondition, job_not_found
from jobworker.model import ExitInfo, JobState, JobStatus, TerminationReason
from jobworker.usage import JobUsage, UsageRing, UsageSample

log = structlog.get_logger("jobworker.ray.front")


@attrs.define(eq=False)
class KeptUsage:
    """The samples of a running job the front relayed from its agent, newest kept on."""

    source: str
    ring: UsageRing = attrs.Factory(UsageRing)

    def add(self, usage: JobUsage) -> None:
        if usage.source:
            self.source = usage.source
        newest = self.ring.latest
        for sample in usage.samples:  # oldest first
            if newest is None or sample.time > newest.time:
                self.ring.add(sample)


@attrs.define(eq=False)
class Job:
    status: JobStatus
    node: Node
    done: asyncio.Event = attrs.Factory(asyncio.Event)
    output_lost: bool = False
    usage: KeptUsage | None = None
    #: The newest sample pulled from its agent (kept once it ends: a lost node's job
    #: keeps its last one).
    newest_usage: UsageSample | None = None


@attrs.define(eq=False)
class JobTable:
    """Every job the front knows of, by id. ``ended_hook`` hears each end this front sees,
    once; ``learnt_hook`` the jobs a poll brought that the table did not know (started by
    another front server, or before this one)."""

    _ended_hook: Callable[[JobStatus], None]
    _learnt_hook: Callable[[Node, builtins.list[JobStatus]], None]
    _jobs: dict[str, Job] = attrs.Factory(dict)
    #: Running jobs per owner, kept as jobs start and end (a start walks no table).
    _running: collections.Counter[str] = attrs.Factory(collections.Counter)

    def add(self, status: JobStatus, node: Node) -> Job:
        job = self._jobs[status.job_id] = Job(status, node)
        if status.state is JobState.EXITED:
            job.done.set()
        else:
            self._running[status.owner] += 1
            node.running += 1
        return job

    def find(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def lookup(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise job_not_found(job_id)
        return job

    def statuses(self) -> builtins.list[JobStatus]:
        return [job.status for job in self._jobs.values()]

    def running(self) -> builtins.list[Job]:
        return [job for job in self._jobs.values() if not job.done.is_set()]

    @property
    def running_count(self) -> int:
        return self._running.total()

    def latest_usage(self) -> builtins.list[tuple[JobStatus, UsageSample]]:
        # Called from the metrics server's thread: list() copies the values in one step
        # (no Python code runs meanwhile), so the loop adding a job cannot break it.
        return [(j.status, j.newest_usage) for j in list(self._jobs.values()) if j.newest_usage]

    # -- the agents' reports ----------------------------------------------------------------

    def merge(self, node: Node, reply: PollReply) -> None:
        learnt = []
        for status in reply.jobs:
            job = self._jobs.get(status.job_id)
            if job is None:  # started by another front server, or an earlier one
                self.add(status, node)
                learnt.append(status)
                if status.state is not JobState.EXITED:
                    log.debug("job_learnt", job_id=status.job_id, node=node.name,
                              owner=status.owner)  # fmt: skip
                continue
            self.update(job, status)
        if learnt:
            self._learnt_hook(node, learnt)
        for job_id in reply.evicted:
            job = self._jobs.get(job_id)
            if job is not None and job.node is node and job.done.is_set():
                del self._jobs[job_id]

    def update(self, job: Job, status: JobStatus) -> None:
        if job.done.is_set():
            return
        job.status = status
        if status.state is JobState.EXITED:
            job.usage = None  # the agent keeps the samples with the job
            self._ended(job)

    def _ended(self, job: Job) -> None:
        job.done.set()
        status = job.status
        self._running[status.owner] -= 1
        if not self._running[status.owner]:
            del self._running[status.owner]
        job.node.running -= 1
        assert status.exit is not None
        log.info(
            "job_exited",
            job_id=status.job_id,
            node=job.node.name,
            reason=status.exit.reason.value,
            exit_code=status.exit.exit_code,
            signal=status.exit.signal,
        )
        self._ended_hook(status)

    def lose(self, node: Node, why: str) -> None:
        """End ``node``'s running jobs with ``node_lost`` (the node is gone)."""
        node.lost = True
        lost = [j for j in self.running() if j.node is node]
        log.error("node_lost", node=node.name, node_id=node.node_id, error=why,
                  running_jobs=[j.status.job_id for j in lost])  # fmt: skip
        now = time.time()
        for job in lost:
            job.output_lost = True
            job.status = attrs.evolve(
                job.status,
                state=JobState.EXITED,
                ended_at=now,
                exit=ExitInfo(reason=TerminationReason.NODE_LOST),
            )
            self._ended(job)

    # -- usage kept for lost nodes ----------------------------------------------------------

    @staticmethod
    def keep_usage(job: Job, usage: JobUsage) -> None:
        if job.done.is_set():
            return
        if job.usage is None:
            job.usage = KeptUsage(usage.source)
        job.usage.add(usage)
        job.newest_usage = job.usage.ring.latest

    @staticmethod
    def kept_usage(job: Job, last: int) -> JobUsage:
        kept = job.usage
        if kept is None or not len(kept.ring):
            raise FailedPrecondition(
                f"job {job.status.job_id} ran on node {job.node.name}, which was lost with the"
                " job's usage samples (the front server had relayed none)"
            )
        return JobUsage(job.status.job_id, kept.source, kept.ring.samples(last))

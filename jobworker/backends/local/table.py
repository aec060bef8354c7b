"""The local engine's jobs by id, and the two rules by which clients share them.

Jobs live in memory by id. A finished job is retained (with its spooled output) until the
retention bound evicts it, so a long-running server does not grow without limit.

Clients share the server fairly: each owner may have at most ``max_per_client`` jobs
starting or running, and when more than ``retain_finished`` finished jobs are kept, the one
evicted is the oldest of the owner with the most finished jobs retained, so a client that
floods the server only ever evicts its own history.
"""

from __future__ import annotations

import collections

import attrs

from jobworker.backends.local.job import Job
from jobworker.errors import client_full, server_full


@attrs.define
class JobTable:
    """Every job one server retains, with its counts. Used on the event loop's thread
    (the metrics server's thread only reads ``jobs``)."""

    max_running: int
    max_per_client: int
    retain_finished: int
    retain_seconds: float
    #: Every job retained, running or finished, by id.
    jobs: dict[str, Job] = attrs.Factory(dict)
    #: Jobs being started, not in ``jobs`` yet.
    starting: int = 0
    #: Finished job ids of each owner, oldest first, and how many there are in all.
    _finished: dict[str, collections.deque[str]] = attrs.Factory(dict)
    _finished_count: int = 0
    #: Jobs starting or running, by owner (the per-client quota).
    _active: collections.Counter[str] = attrs.Factory(collections.Counter)

    @property
    def running(self) -> int:
        """Jobs starting or running."""
        return len(self.jobs) - self._finished_count + self.starting

    @property
    def finished(self) -> int:
        return self._finished_count

    def check_room(self, owner: str) -> None:
        """ResourceExhausted when the server, or ``owner``, has all the jobs it may."""
        if self.running >= self.max_running:
            raise server_full(self.running, self.max_running)
        if self._active[owner] >= self.max_per_client:
            raise client_full(owner, self._active[owner], self.max_per_client)

    def admit(self, owner: str) -> None:
        """Count a job of ``owner`` as starting; :meth:`release` if it does not start."""
        self.starting += 1
        self._active[owner] += 1

    def release(self, owner: str) -> None:
        """A job of ``owner`` ended, or never started: its place in the quota is free."""
        self._active[owner] -= 1
        if not self._active[owner]:
            del self._active[owner]

    def add_running(self, job: Job) -> None:
        """A running job the previous server left (live restore), counted in the quota."""
        self.jobs[job.job_id] = job
        self._active[job.owner] += 1

    def add_finished(self, job: Job) -> None:
        """A job that has ended, retained until :meth:`evict` drops it."""
        self.jobs[job.job_id] = job
        self._finished.setdefault(job.owner, collections.deque()).append(job.job_id)
        self._finished_count += 1

    def evict(self, now: float) -> list[Job]:
        """Drop finished jobs past ``retain_seconds``, then, while more than
        ``retain_finished`` are kept, the oldest of the owner who has the most; the jobs
        dropped, whose files the caller removes."""
        evicted = []
        cutoff = now - self.retain_seconds
        for owner, ids in list(self._finished.items()):
            while ids and (self.jobs[ids[0]].ended_at or 0) <= cutoff:
                evicted.append(self._evict_oldest_of(owner))
        while self._finished_count > self.retain_finished:
            owner = max(self._finished, key=lambda o: len(self._finished[o]))
            evicted.append(self._evict_oldest_of(owner))
        return evicted

    def _evict_oldest_of(self, owner: str) -> Job:
        ids = self._finished[owner]
        job = self.jobs.pop(ids.popleft())
        if not ids:
            del self._finished[owner]
        self._finished_count -= 1
        return job

    def clear(self) -> None:
        self.jobs.clear()
        self._finished.clear()
        self._finished_count = 0

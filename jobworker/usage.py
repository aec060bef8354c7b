"""Usage over time: what each job uses, sampled every second while it runs.

Where a sample comes from:

* a containment that can measure itself (:class:`SelfSampling`: the cgroupv2 plugin's
  cgroup reads ``cpu.stat``, ``memory.current``, ``memory.peak``, ``io.stat`` and
  ``pids.current``);
* otherwise ``/proc``: the launcher calls ``setsid``, so the job's processes are those whose
  session id is the job's pid. One scan of ``/proc`` per tick serves every such job.

Each job keeps a :class:`UsageRing` of at most :data:`RING_SIZE` samples, kept with the job
until it is evicted. When the ring is full it drops every other sample and from then on
keeps one sample in two (then four, ...): the ring always covers the job's whole life, at a
resolution that halves as it ages, and never grows. The newest sample is always kept too,
so rates (CPU %, IO bytes/s) use the last second.

Memory: a sample is 7 machine words in an ``array`` (56 bytes); a ring is at most
``RING_SIZE * 56`` = 13.4 KiB, so ``--max-jobs 1000`` running plus ``--retain-jobs 1000``
retained cost at most 27 MiB.
"""

from __future__ import annotations

import array
import asyncio
import os
import time
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import attrs
import structlog

log = structlog.get_logger("jobworker.usage")

#: Samples kept per job (see the module docstring for how older ones thin out).
RING_SIZE = 240
#: Seconds between two samples of a running job...
SAMPLE_INTERVAL = 1.0
#: ... unless a round of sampling costs more CPU, on average, than this share of one core:
#: then the period stretches so that it does not (thousands of jobs on a slow machine).
CPU_BUDGET = 0.05
#: Weight of the newest round in that average: one slow round (a cgroup's statistics being
#: flushed, a preempted thread) must not stall sampling for seconds.
_COST_WEIGHT = 0.2

_FIELDS = 7
_NONE = -1
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@attrs.frozen
class UsageSample:
    """What a job used at ``time`` (Unix seconds): counters since it started, gauges now."""

    time: float
    cpu_usec: int
    memory_bytes: int
    pids: int
    memory_peak_bytes: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None

    def _pack(self) -> tuple[int, ...]:
        def opt(v: int | None) -> int:
            return _NONE if v is None else v

        return (
            int(self.time * 1000),
            self.cpu_usec,
            self.memory_bytes,
            self.pids,
            opt(self.memory_peak_bytes),
            opt(self.io_read_bytes),
            opt(self.io_write_bytes),
        )

    @classmethod
    def _unpack(cls, raw: Sequence[int]) -> UsageSample:
        def opt(v: int) -> int | None:
            return None if v == _NONE else v

        return cls(raw[0] / 1000, raw[1], raw[2], raw[3], opt(raw[4]), opt(raw[5]), opt(raw[6]))


@attrs.frozen
class JobUsage:
    """A job's samples, oldest first, and where they come from ("cgroupv2", "proc")."""

    job_id: str
    source: str
    samples: tuple[UsageSample, ...]


@runtime_checkable
class SelfSampling(Protocol):
    """A containment that measures its own processes (the cgroupv2 plugin's cgroup)."""

    def sample_usage(self) -> UsageSample | None:
        """The job's usage now, or None once it is gone. Called in a worker thread."""


@runtime_checkable
class UsageSource(Protocol):
    """A job backend that samples usage (the local :class:`jobworker.jobs.JobManager`)."""

    def usage(self, job_id: str, last: int = 0) -> JobUsage:
        """The job's samples (the newest ``last`` only, 0: all); NotFound if unknown."""

    def running_usage(self, last: int = 0) -> list[JobUsage]:
        """Samples of every running job."""


class UsageRing:
    """At most ``capacity`` samples covering a job's whole life (see the module docstring)."""

    def __init__(self, capacity: int = RING_SIZE) -> None:
        self._capacity = capacity
        self._data = array.array("q")
        self._stride = 1
        self._skipped = 0
        self.latest: UsageSample | None = None
        self.previous: UsageSample | None = None

    def __len__(self) -> int:
        return len(self._data) // _FIELDS

    def add(self, sample: UsageSample) -> None:
        self.previous, self.latest = self.latest, sample
        self._skipped += 1
        if self._skipped < self._stride and len(self):
            return
        self._skipped = 0
        if len(self) >= self._capacity:
            self._thin()
        self._data.extend(sample._pack())

    def _thin(self) -> None:
        kept = array.array("q")
        for i in range(0, len(self), 2):
            kept.extend(self._data[i * _FIELDS : (i + 1) * _FIELDS])
        self._data = kept
        self._stride *= 2

    def samples(self, last: int = 0) -> tuple[UsageSample, ...]:
        """Oldest first, the newest always included; ``last`` > 0: only that many."""
        newest = [s for s in (self.previous, self.latest) if s is not None]
        kept = {s._pack() for s in newest}
        data = self._data
        out = [
            UsageSample._unpack(raw)
            for raw in (tuple(data[i : i + _FIELDS]) for i in range(0, len(data), _FIELDS))
            if raw not in kept
        ]
        out.extend(newest)
        return tuple(out[-last:] if last > 0 else out)


# -- reading /proc ----------------------------------------------------------------------


@attrs.define
class _Totals:
    cpu_ticks: int = 0
    rss_pages: int = 0
    pids: int = 0
    io_read: int | None = 0
    io_write: int | None = 0


def read_small(path: str) -> bytes | None:
    """A small /proc or cgroup file in one read (3x cheaper than ``Path.read_text``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _proc_io(pid: str) -> tuple[int, int] | None:
    """``read_bytes``/``write_bytes`` (block IO) of one process; None without permission."""
    raw = read_small(f"/proc/{pid}/io")
    if raw is None:
        return None
    fields = dict(line.split(b": ", 1) for line in raw.splitlines() if b": " in line)
    return int(fields.get(b"read_bytes", 0)), int(fields.get(b"write_bytes", 0))


def sample_sessions(sessions: Iterable[int], now: float | None = None) -> dict[int, UsageSample]:
    """One ``/proc`` scan: the usage of every process whose session id is in ``sessions``.

    CPU counts the processes' own time and that of children they reaped (a shell's
    finished commands); memory is the sum of resident set sizes.
    """
    wanted = set(sessions)
    totals: dict[int, _Totals] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        raw = read_small(f"/proc/{pid}/stat")
        if raw is None:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = raw[raw.rfind(b")") + 2 :].split()
        session = int(fields[3])
        if session not in wanted:
            continue
        t = totals.setdefault(session, _Totals())
        t.cpu_ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        t.rss_pages += int(fields[21])
        t.pids += 1
        io = _proc_io(pid)
        if io is None or t.io_read is None or t.io_write is None:
            t.io_read = t.io_write = None
        else:
            t.io_read += io[0]
            t.io_write += io[1]
    at = time.time() if now is None else now
    return {
        session: UsageSample(
            time=at,
            cpu_usec=t.cpu_ticks * 1_000_000 // _CLOCK_TICKS,
            memory_bytes=t.rss_pages * _PAGE_SIZE,
            pids=t.pids,
            io_read_bytes=t.io_read,
            io_write_bytes=t.io_write,
        )
        for session, t in totals.items()
    }


# -- the sampler --------------------------------------------------------------------------


@attrs.define(eq=False)
class _Tracked:
    pid: int
    containment: object
    ring: UsageRing
    running: bool = True

    @property
    def source(self) -> str:
        return "cgroupv2" if isinstance(self.containment, SelfSampling) else "proc"


class UsageSampler:
    """Samples every running job each :data:`SAMPLE_INTERVAL` seconds into its ring.

    Runs on the event loop only while some job runs; the reading itself happens in a
    worker thread, so a slow ``/proc`` never delays an RPC.
    """

    def __init__(self, interval: float = SAMPLE_INTERVAL, capacity: int = RING_SIZE) -> None:
        self._interval = interval
        self._capacity = capacity
        self._jobs: dict[str, _Tracked] = {}
        self._task: asyncio.Task[None] | None = None

    def track(self, job_id: str, pid: int, containment: object) -> None:
        """Start sampling a job whose command now runs."""
        self._jobs[job_id] = _Tracked(pid, containment, UsageRing(self._capacity))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-sampler")

    def finished(self, job_id: str) -> None:
        """The job is over: keep its samples, take no more."""
        tracked = self._jobs.get(job_id)
        if tracked is not None:
            tracked.running = False

    def forget(self, job_id: str) -> None:
        """The job is evicted: drop its samples."""
        self._jobs.pop(job_id, None)

    def get(self, job_id: str, last: int = 0) -> JobUsage | None:
        tracked = self._jobs.get(job_id)
        if tracked is None:
            return None
        return JobUsage(job_id, tracked.source, tracked.ring.samples(last))

    def running(self, last: int = 0) -> list[JobUsage]:
        return [
            JobUsage(job_id, t.source, t.ring.samples(last))
            for job_id, t in self._jobs.items()
            if t.running
        ]

    def latest(self) -> list[tuple[str, UsageSample]]:
        """The newest sample of every job still kept (running or retained)."""
        return [(job_id, t.ring.latest) for job_id, t in self._jobs.items() if t.ring.latest]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        average = 0.0
        while True:
            running = {job_id: t for job_id, t in self._jobs.items() if t.running}
            if not running:
                return
            cost = 0.0
            try:
                samples, cost = await asyncio.to_thread(_timed_sample, running)
            except Exception:
                log.exception("usage_sampling_failed")
                samples = {}
            for job_id, sample in samples.items():
                tracked = self._jobs.get(job_id)
                if tracked is not None and tracked.running:
                    tracked.ring.add(sample)
            average = cost if not average else average + _COST_WEIGHT * (cost - average)
            await asyncio.sleep(max(self._interval, average / CPU_BUDGET))


def _timed_sample(jobs: dict[str, _Tracked]) -> tuple[dict[str, UsageSample], float]:
    """:func:`sample_jobs` and the CPU seconds it took (this thread's)."""
    began = time.thread_time()
    samples = sample_jobs(jobs)
    return samples, time.thread_time() - began


def sample_jobs(jobs: dict[str, _Tracked]) -> dict[str, UsageSample]:
    """One sample of each job in ``jobs``: from its containment, else from ``/proc``."""
    out: dict[str, UsageSample] = {}
    by_session: dict[int, str] = {}
    for job_id, tracked in jobs.items():
        if isinstance(tracked.containment, SelfSampling):
            sample = tracked.containment.sample_usage()
            if sample is not None:
                out[job_id] = sample
        else:
            by_session[tracked.pid] = job_id
    if by_session:
        for session, sample in sample_sessions(by_session).items():
            out[by_session[session]] = sample
    return out

"""Usage sampling on a host: what each job uses, sampled every second while it runs.

Where a sample comes from:

* a containment that can measure itself (:class:`SelfSampling`: the cgroupv2 plugin's
  cgroup reads ``cpu.stat`` and ``memory.current`` each tick, and ``memory.peak``,
  ``io.stat`` and ``pids.current`` one tick in :data:`SLOW_TICKS`);
* otherwise ``/proc`` (:class:`ProcTable`): the launcher calls ``setsid``, so the job's
  processes are those whose session id is the job's pid. Each tick lists ``/proc``, reads
  the ``stat`` of each job's processes through a file kept open, and reads a process's
  ``io`` one tick in :data:`SLOW_TICKS`.

What a sample means, and how old each field can be (ticks are a second apart):

* ``cpu_usec``, ``memory_bytes``: read at ``time``. From ``/proc``: the processes in the
  session at that tick, one forked since the previous tick included; one that died or left
  the session (``setsid``) no longer counts, though its CPU stays in its parent's once
  reaped (``cutime``);
* ``pids``: from ``/proc``, at ``time``; from a cgroup, up to ``SLOW_TICKS - 1`` ticks old;
* ``memory_peak_bytes`` (cgroups only), ``io_read_bytes``, ``io_write_bytes``: up to
  ``SLOW_TICKS - 1`` ticks old (``/proc``: per process, and a process is read when found).
  They change slowly or are rates over many seconds, and their files cost as much to read
  as the rest together.

The ``/proc`` reader keeps one descriptor per job process, at most a quarter of the soft
``RLIMIT_NOFILE`` (past that, the rest are read by path, at twice the cost); all are closed
when the processes go, when their job ends, and when no job is sampled from ``/proc``.
One tick of 1000 jobs costs about 25 ms of CPU, either way (docs/performance.md).

The samples and the ring that keeps them are :mod:`jobworker.usage`.
"""

from __future__ import annotations

import asyncio
import os
import resource
import threading
import time
from collections.abc import Iterable, Mapping

import attrs
import structlog

from jobworker.usage import RING_SIZE, JobUsage, SelfSampling, UsageRing, UsageSample

log = structlog.get_logger("jobworker.backends.local.sampling")

#: Seconds between two samples of a running job...
SAMPLE_INTERVAL = 1.0
#: ... unless a round of sampling costs more CPU, on average, than this share of one core:
#: then the period stretches so that it does not (thousands of jobs on a slow machine).
CPU_BUDGET = 0.05
#: Weight of the newest round in that average: one slow round (a cgroup's statistics being
#: flushed, a preempted thread) must not stall sampling for seconds.
_COST_WEIGHT = 0.2

#: A process's ``/proc/PID/io``, and a cgroup's ``io.stat``, ``pids.current`` and
#: ``memory.peak``, are read one tick in this many (staggered), their last value kept between.
SLOW_TICKS = 5
#: Every this many ticks, the ``/proc`` reader reads the processes of no job again.
RESCAN_TICKS = 10

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# -- reading /proc ----------------------------------------------------------------------


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


@attrs.define
class _Proc:
    """One process of a sampled job, from the tick it was found to the tick it is gone."""

    name: str  # its /proc directory
    #: Its ``/proc/PID/stat``, open: reads need no path lookup and never reach a process
    #: that reused the pid. None past :attr:`ProcTable.max_open`: read by path instead.
    fd: int | None
    io: tuple[int, int] | None = None
    io_phase: int = 0

    def stat(self) -> bytes | None:
        if self.fd is None:
            return read_small(f"/proc/{self.name}/stat")
        try:
            return os.pread(self.fd, 4096, 0)
        except OSError:
            return None  # ESRCH: it died (and was reaped)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _parse_stat(raw: bytes) -> tuple[int, int, int, int]:
    """Parent pid, session id, CPU ticks (own and reaped children's) and resident pages of
    a stat line."""
    # The command name may hold spaces and parentheses: split after the last ')'.
    f = raw[raw.rfind(b")") + 2 :].split(None, 22)
    return int(f[1]), int(f[3]), int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]), int(f[21])


def _helper_usage(pid: int, levels: int) -> tuple[int, int]:
    """Resident pages and number of jobworker's own processes: the top ``levels`` levels
    of the job's tree, from its pid down (:attr:`Spawned.helpers`)."""
    pages = count = 0
    level = [pid]
    for _ in range(levels):
        below: list[int] = []
        for member in level:
            raw = read_small(f"/proc/{member}/stat")
            if raw is None:
                continue
            pages += _parse_stat(raw)[3]
            count += 1
            children = read_small(f"/proc/{member}/task/{member}/children") or b""
            below += [int(child) for child in children.split()]
        level = below
    return pages, count


class ProcTable:
    """The processes of the jobs sampled from ``/proc``, kept from one tick to the next.

    A job's processes are those whose session id is the job's pid. A process cannot join a
    session it was not forked into (``setsid`` only makes a new one, led by the caller), so
    a process once seen outside every job's session stays outside: each tick lists ``/proc``
    and reads only the processes it has not seen, plus the jobs' own. Every
    :data:`RESCAN_TICKS` ticks, and whenever a new job's session appears, it reads them all
    again (a pid reused by a job's process after the old one was seen is counted from then).

    Not thread-safe: one sampler thread at a time (:class:`UsageSampler` holds a lock).
    """

    def __init__(self, max_open: int | None = None) -> None:
        #: Stat files kept open at most: a quarter of the soft ``RLIMIT_NOFILE``.
        self.max_open = (
            resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4 if max_open is None else max_open
        )
        self._procs: dict[str, _Proc] = {}
        self._foreign: set[str] = set()
        self._sessions: set[int] = set()
        self._open = 0
        self._tick = 0

    @property
    def open_files(self) -> int:
        return self._open

    def sample(
        self,
        sessions: Iterable[int],
        now: float | None = None,
        helpers: Mapping[int, int] | None = None,
    ) -> dict[int, UsageSample]:
        """The usage of every session in ``sessions`` that has a process.

        CPU counts the processes' own time and that of children they reaped (a shell's
        finished commands); memory is the sum of resident set sizes; IO is at most
        :data:`SLOW_TICKS` - 1 ticks old per process. ``helpers`` gives, per session, how
        many levels at the top of its tree are jobworker's own (:attr:`Spawned.helpers`):
        their memory and count are left out, their CPU kept (an init's reaped orphans are
        the job's).
        """
        helpers = helpers or {}
        wanted = set(sessions)
        self._tick += 1
        if self._tick % RESCAN_TICKS == 0 or not wanted <= self._sessions:
            self._foreign.clear()
        self._sessions = wanted
        listed = {name for name in os.listdir("/proc") if name[0].isdigit()}
        self._foreign &= listed
        for name in listed - self._procs.keys() - self._foreign:
            self._discover(name, wanted)
        totals: dict[int, list[int]] = {}
        no_io: set[int] = set()
        gone: list[_Proc] = []
        tick = self._tick % SLOW_TICKS
        for proc in self._procs.values():
            raw = proc.stat()
            if raw is None:
                gone.append(proc)
                continue
            parent, session, cpu_ticks, rss_pages = _parse_stat(raw)
            if session not in wanted:  # it called setsid, or its job is over
                gone.append(proc)
                self._foreign.add(proc.name)
                continue
            if proc.io_phase == tick:
                proc.io = _proc_io(proc.name)
            t = totals.get(session)
            if t is None:
                t = totals[session] = [0, 0, 0, 0, 0]
            t[0] += cpu_ticks
            ahead = helpers.get(session, 0)
            if not ahead or (int(proc.name) != session and (ahead < 2 or parent != session)):
                t[1] += rss_pages
                t[2] += 1
            io = proc.io
            if io is None:
                no_io.add(session)
            else:
                t[3] += io[0]
                t[4] += io[1]
        for proc in gone:
            self._drop(proc)
        at = time.time() if now is None else now
        return {
            session: UsageSample(
                at,
                cpu * 1_000_000 // _CLOCK_TICKS,
                rss * _PAGE_SIZE,
                pids,
                None,
                None if session in no_io else io_read,
                None if session in no_io else io_write,
            )
            for session, (cpu, rss, pids, io_read, io_write) in totals.items()
        }

    def _discover(self, name: str, wanted: set[int]) -> None:
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # gone already
        try:
            raw = os.pread(fd, 4096, 0)
        except OSError:
            os.close(fd)
            return
        if _parse_stat(raw)[1] not in wanted:
            os.close(fd)
            self._foreign.add(name)
            return
        if self._open >= self.max_open:
            os.close(fd)
            proc = _Proc(name, None)
        else:
            self._open += 1
            proc = _Proc(name, fd)
        proc.io = _proc_io(name)
        proc.io_phase = int(name) % SLOW_TICKS
        self._procs[name] = proc

    def _drop(self, proc: _Proc) -> None:
        if proc.fd is not None:
            self._open -= 1
        proc.close()
        del self._procs[proc.name]

    def close(self) -> None:
        """Close every file kept open; the next :meth:`sample` starts afresh."""
        for proc in list(self._procs.values()):
            self._drop(proc)
        self._foreign.clear()
        self._sessions.clear()


# -- the sampler --------------------------------------------------------------------------


@attrs.define(eq=False)
class _Tracked:
    pid: int
    containment: object
    ring: UsageRing
    running: bool = True
    #: :attr:`Spawned.helpers`: jobworker's processes heading the job, left out of usage.
    helpers: int = 0
    #: The containment, if it samples itself: asked once, as ``isinstance`` on a runtime
    #: protocol costs microseconds, which 1000 jobs a second would feel.
    self_sampling: SelfSampling | None = attrs.field(init=False)

    @self_sampling.default
    def _self_sampling(self) -> SelfSampling | None:
        return self.containment if isinstance(self.containment, SelfSampling) else None

    @property
    def source(self) -> str:
        return "proc" if self.self_sampling is None else "cgroupv2"


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
        self._procs = ProcTable()
        #: Held while a worker thread reads: a cancelled tick's thread still runs.
        self._reading = threading.Lock()
        self._running = 0
        #: The sampler's sleep between ticks, resolved early when the last running job
        #: ends: it stops (closing the files it keeps open) at once, not a period later.
        self._sleeping: asyncio.Future[None] | None = None

    def track(self, job_id: str, pid: int, containment: object, helpers: int = 0) -> None:
        """Start sampling a job whose command now runs; ``helpers``: see ``Spawned``."""
        self._jobs[job_id] = _Tracked(pid, containment, UsageRing(self._capacity), helpers=helpers)
        self._running += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-sampler")

    def finished(self, job_id: str) -> None:
        """The job is over: keep its samples, take no more."""
        tracked = self._jobs.get(job_id)
        if tracked is not None and tracked.running:
            tracked.running = False
            self._running -= 1
            if not self._running and self._sleeping is not None:
                _wake(self._sleeping)

    def forget(self, job_id: str) -> None:
        """The job is evicted: drop its samples."""
        self.finished(job_id)
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
        # Called from the metrics server's thread: list() copies the items in one step (no
        # Python code runs meanwhile), so the loop adding a job cannot break the iteration.
        return [(job_id, t.ring.latest) for job_id, t in list(self._jobs.items()) if t.ring.latest]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await asyncio.to_thread(self._close_files)

    def _close_files(self) -> None:
        with self._reading:
            self._procs.close()

    def _timed_sample(self, jobs: dict[str, _Tracked]) -> tuple[dict[str, UsageSample], float]:
        """:func:`sample_jobs` and the CPU seconds it took (this thread's)."""
        with self._reading:
            began = time.thread_time()
            samples = sample_jobs(jobs, self._procs)
            return samples, time.thread_time() - began

    async def _run(self) -> None:
        average = 0.0
        while True:
            running = {job_id: t for job_id, t in self._jobs.items() if t.running}
            if not running:
                # No tick is in flight: nothing else reads the table now.
                self._procs.close()
                return
            cost = 0.0
            try:
                samples, cost = await asyncio.to_thread(self._timed_sample, running)
            except Exception:
                log.exception("usage_sampling_failed")
                samples = {}
            for job_id, sample in samples.items():
                tracked = self._jobs.get(job_id)
                if tracked is not None and tracked.running:
                    tracked.ring.add(sample)
            average = cost if not average else average + _COST_WEIGHT * (cost - average)
            await self._sleep(max(self._interval, average / CPU_BUDGET))

    async def _sleep(self, seconds: float) -> None:
        """``asyncio.sleep``, ended early by :meth:`finished` (no task of its own: a
        server's task count stays what its RPCs make it)."""
        loop = asyncio.get_running_loop()
        self._sleeping = loop.create_future()
        timer = loop.call_later(seconds, _wake, self._sleeping)
        try:
            await self._sleeping
        finally:
            timer.cancel()
            self._sleeping = None


def _wake(sleeping: asyncio.Future[None]) -> None:
    if not sleeping.done():
        sleeping.set_result(None)


def sample_jobs(jobs: dict[str, _Tracked], procs: ProcTable) -> dict[str, UsageSample]:
    """One sample of each job in ``jobs``: from its containment, else from ``procs``."""
    out: dict[str, UsageSample] = {}
    by_session: dict[int, str] = {}
    helpers: dict[int, int] = {}
    for job_id, tracked in jobs.items():
        if tracked.self_sampling is None:
            by_session[tracked.pid] = job_id
            if tracked.helpers:
                helpers[tracked.pid] = tracked.helpers
        else:
            sample = tracked.self_sampling.sample_usage()
            if sample is not None and tracked.helpers:
                # The cgroup counts jobworker's own processes too: take them out.
                pages, count = _helper_usage(tracked.pid, tracked.helpers)
                memory, pids = sample.memory_bytes, sample.pids  # None: unreadable, stays so
                sample = attrs.evolve(
                    sample,
                    memory_bytes=None if memory is None else max(0, memory - pages * _PAGE_SIZE),
                    pids=None if pids is None else max(0, pids - count),
                )
            if sample is not None:
                out[job_id] = sample
    if by_session:
        for session, sample in procs.sample(by_session, helpers=helpers).items():
            out[by_session[session]] = sample
    else:
        procs.close()  # the last job sampled from /proc is over: keep no file open
    return out

"""The job manager: starts, tracks, streams and stops jobs, all on one asyncio loop.

Jobs live in memory by id. A finished job is retained (with its spooled output) until the
retention bound evicts it, so a long-running server does not grow without limit.

Clients share the server fairly: each owner may have at most ``max_running_per_client``
jobs starting or running, and when more than ``retain_finished`` finished jobs are kept,
the one evicted is the oldest of the owner with the most finished jobs retained, so a
client that floods the server only ever evicts its own history.

A job is over when its main process has exited, every other process of its containment
has been killed and is gone, and both output pipes are drained: only then do followers see
end-of-stream and plugins see ``on_exit``.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextvars
import functools
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import structlog

from jobworker.backends.local.containment import Containment, ContainmentReport, ProcessGroup
from jobworker.backends.local.ingest import Ingest, Pipe
from jobworker.backends.local.ingest_process import IngestProcess, RemotePipe
from jobworker.backends.local.isolation import IsolationPlan
from jobworker.backends.local.outputlog import OutputLog, SpoolBudget
from jobworker.backends.local.sampling import UsageSampler
from jobworker.backends.local.spawn import PIPE_SIZE, Spawner, read_exit_report, resolve_future
from jobworker.errors import (
    FailedPrecondition,
    InvalidArgument,
    JobworkerError,
    ResourceExhausted,
    job_not_found,
)
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.model import (
    ExitInfo,
    InputChunk,
    InputResult,
    JobState,
    JobStatus,
    OutputChunk,
    ResourceUsage,
    StopResult,
    Stream,
    TerminationReason,
    describe_end,
    new_job_id,
)
from jobworker.usage import JobUsage, UsageSample

log = structlog.get_logger("jobworker.backends.local.manager")

#: After the processes are gone, how long pipes may stay open (held by a process that left
#: a process group, which only a cgroup can track) before the server closes them.
PIPE_DRAIN_TIMEOUT = 2.0
#: How long killed processes may take to disappear (one stuck in uninterruptible IO)
#: before the job ends anyway, with an error log naming what is left.
SETTLE_TIMEOUT = 5.0
#: Reads handed to ``jobworker_output_chunk`` observers and not yet seen by them: the
#: spool-writing thread waits beyond this, so a slow observer bounds memory, never loses a byte.
OBSERVER_BACKLOG = 8
#: After SIGKILL, how long a stop waits for the job to end before it gives up waiting.
KILL_TIMEOUT = SETTLE_TIMEOUT + PIPE_DRAIN_TIMEOUT + 1.0
#: The least time SIGTERM gets before SIGKILL, even with grace 0: a process that dies of
#: SIGTERM at once is not killed (nor reported ``escalated``). An isolated job's PID 1
#: needs the moment to report the command's status before SIGKILL takes it too.
SIGTERM_MIN_SECONDS = 0.25


@attrs.define(eq=False)
class _Job:
    job_id: str
    spec: JobSpec
    owner: str
    containment: Containment
    pid: int
    pidfd: int  # -1 once the main process is reaped
    exit_report: int  # -1 once read
    log: OutputLog
    started_at: float
    plan: IsolationPlan | None
    done: asyncio.Event = attrs.Factory(asyncio.Event)
    exited: asyncio.Event = attrs.Factory(asyncio.Event)  # the main process has exited
    ended_at: float | None = None
    exit: ExitInfo | None = None
    usage: ResourceUsage | None = None
    stopped_by: str | None = None
    escalated: bool = False
    stop_task: asyncio.Task[None] | None = None
    #: Its stdout and stderr while they are read (by the ingest process, or by the
    #: threads), by descriptor.
    pipes: dict[int, Pipe | RemotePipe] = attrs.Factory(dict)
    pipes_closed: asyncio.Event = attrs.Factory(asyncio.Event)
    publish_pending: bool = False
    counted: int = 0  # of its output, bytes added to JobManager.output_bytes_read
    cut_logged: bool = False
    stdin: int = -1  # write end of the job's stdin pipe; -1: never open, or closed
    stdin_writer: bool = False  # a write_input call holds stdin
    stdin_wakeup: asyncio.Future[None] | None = None  # what a blocked writer awaits

    def snapshot(self) -> JobStatus:
        return JobStatus(
            job_id=self.job_id,
            spec=self.spec,
            owner=self.owner,
            state=JobState.EXITED if self.done.is_set() else JobState.RUNNING,
            pid=self.pid,
            started_at=self.started_at,
            containment=self.containment.name,
            applied_limits=self.containment.applied,
            ended_at=self.ended_at,
            exit=self.exit,
            usage=self.usage,
            output_bytes=self.log.payload_bytes,
            output_kept_bytes=self.log.kept_bytes,
            output_truncated=self.log.truncated,
            user=None if self.plan is None else self.plan.account.name,
            uid=os.getuid() if self.plan is None else self.plan.account.uid,
            isolation="none" if self.plan is None else self.plan.describe(),
        )


def _from_wait_status(raw: int) -> tuple[int, int]:
    """``waitid``'s (si_code, si_status) for a raw ``wait`` status."""
    if os.WIFSIGNALED(raw):
        code = os.CLD_DUMPED if os.WCOREDUMP(raw) else os.CLD_KILLED
        return code, os.WTERMSIG(raw)
    return os.CLD_EXITED, os.WEXITSTATUS(raw)


def _exit_info(job: _Job, code: int, status: int, report: ContainmentReport) -> ExitInfo:
    killed = code in (os.CLD_KILLED, os.CLD_DUMPED)
    exit_code = None if killed else status
    sig = status if killed else None
    if report.oom_killed:
        reason = TerminationReason.OOM_KILLED
    elif job.stopped_by is not None:
        reason = TerminationReason.STOPPED
    elif killed:
        reason = TerminationReason.SIGNALED
    else:
        reason = TerminationReason.EXITED
    return ExitInfo(
        reason=reason,
        exit_code=exit_code,
        signal=sig,
        stopped_by=job.stopped_by,
        escalated=job.escalated,
    )


class JobManager:
    """Owns every job of one server. All methods run on the event loop's thread."""

    def __init__(
        self,
        plugins: Plugins,
        spool_dir: Path,
        *,
        default_grace: float = 10.0,
        max_running: int = 1000,
        max_running_per_client: int | None = None,
        retain_finished: int = 1000,
        retain_seconds: float = 3600.0,
        max_output_bytes: int | None = None,
        max_spool_bytes: int | None = None,
    ) -> None:
        self._plugins = plugins
        self._spool_dir = spool_dir
        self.default_grace = default_grace
        self._max_running = max_running
        self._max_per_client = max_running_per_client or max_running
        self._retain_finished = retain_finished
        self._retain_seconds = retain_seconds
        self._jobs: dict[str, _Job] = {}
        # Finished job ids of each owner, oldest first, and how many there are in all.
        self._finished: dict[str, collections.deque[str]] = {}
        self._finished_count = 0
        # Jobs starting or running, by owner (the per-client quota).
        self._active: collections.Counter[str] = collections.Counter()
        self._supervisors: set[asyncio.Task[None]] = set()
        self._starting = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._observe_output = plugins.has_impl("jobworker_output_chunk")
        self._observer_slots = threading.BoundedSemaphore(OBSERVER_BACKLOG)
        self._max_output_bytes = max_output_bytes
        self._spool_budget = SpoolBudget(max_spool_bytes)
        #: The ingest threads in this process: they read every pipe when a plugin observes
        #: output chunks, else the pipes of a lost ingest process.
        self._ingest: Ingest | None = None
        #: The ingest process (:mod:`jobworker.backends.local.ingest_process`), when no plugin
        # observes chunks.
        self._ingest_process: IngestProcess | None = None
        self._spawner = Spawner()
        self._usage = UsageSampler()
        #: Where job output is spooled (the metrics plugin reports its size and free space).
        self.spool_dir = spool_dir
        #: Bytes of output read from every job so far, kept or not (for the metrics plugin:
        #: an int, read whole from its thread).
        self.output_bytes_read = 0

    # -- queries -------------------------------------------------------------------------

    def _lookup(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise job_not_found(job_id)
        return job

    def find(self, job_id: str) -> JobStatus | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.snapshot()

    def get(self, job_id: str) -> JobStatus:
        return self._lookup(job_id).snapshot()

    def list(self) -> list[JobStatus]:
        self._evict()
        return [job.snapshot() for job in self._jobs.values()]

    async def usage(self, job_id: str, last: int = 0) -> JobUsage:
        """The job's usage samples (see :mod:`jobworker.usage`); NotFound if unknown."""
        self._lookup(job_id)
        found = self._usage.get(job_id, last)
        return found if found is not None else JobUsage(job_id, "", ())

    async def running_usage(self, last: int = 0) -> builtins.list[JobUsage]:
        return self._usage.running(last)

    def latest_usage(self) -> builtins.list[tuple[JobStatus, UsageSample]]:
        """The newest sample of every job still retained, with its status (for metrics)."""
        # The metrics server's thread: a job evicted meanwhile is skipped, not a KeyError.
        return [
            (job.snapshot(), s)
            for j, s in self._usage.latest()
            if (job := self._jobs.get(j)) is not None
        ]

    @property
    def ingest_pid(self) -> int | None:
        """The ingest process's pid while one runs (None: the pipes are read in here)."""
        return None if self._ingest_process is None else self._ingest_process.pid

    @property
    def running(self) -> int:
        return len(self._jobs) - self._finished_count + self._starting

    # -- start ---------------------------------------------------------------------------

    async def start(self, spec: JobSpec, owner: str) -> JobStatus:
        """Run ``spec`` for ``owner``; return once the command runs (not a launcher).

        Raises InvalidArgument, SpawnError (with the OS reason), ResourceExhausted, or the
        error a plugin vetoed with; plugins hear of it through ``start_refused``. On any
        error nothing of the job remains.
        """
        return await self.start_as(new_job_id(), spec, owner)

    async def start_as(self, job_id: str, spec: JobSpec, owner: str) -> JobStatus:
        """:meth:`start` under an id the caller drew: a cluster front server names a job
        before a node agent runs it, so that both report it under one id."""
        try:
            return await self._start(job_id, spec, owner)
        except JobworkerError as err:
            log.info("job_refused", job_id=job_id, owner=owner, code=err.code, error=str(err))
            self._plugins.start_refused(job_id, spec, owner, err)
            raise

    async def _start(self, job_id: str, spec: JobSpec, owner: str) -> JobStatus:
        if self._closing:
            raise FailedPrecondition("the server is shutting down; retry on another server")
        if spec.node is not None:
            raise InvalidArgument(
                f"node {spec.node!r} asked for, but this server runs jobs on itself only:"
                " --node needs a cluster backend (serve --plugin ray)"
            )
        self._evict()
        if self.running >= self._max_running:
            raise ResourceExhausted(
                f"{self.running} jobs are running, the most this server allows"
                f" ({self._max_running}); stop some or wait for them to finish"
            )
        if self._active[owner] >= self._max_per_client:
            raise ResourceExhausted(
                f"{owner} has {self._active[owner]} jobs starting or running, the most one "
                f"client may have (--max-jobs-per-client {self._max_per_client}); stop some "
                "or wait for them to finish"
            )
        spec = self._plugins.pre_spawn(job_id, spec, owner)
        self._starting += 1
        self._active[owner] += 1
        self._idle.clear()
        try:
            containment = self._plugins.limits_apply(job_id, spec)
            if containment is None:
                if not spec.limits.is_empty():
                    raise FailedPrecondition(
                        "resource limits need a containment plugin, and none is loaded:"
                        " start the server with --plugin cgroupv2, or drop the limits"
                    )
                containment = ProcessGroup()
            try:
                plan = self._plugins.isolate(job_id, spec, owner)
                try:
                    output = OutputLog(
                        self._spool_dir / f"{job_id}.out",
                        max_bytes=self._max_output_bytes,
                        budget=self._spool_budget,
                    )
                except OSError as err:
                    raise FailedPrecondition(
                        f"cannot create the job's output spool in {self._spool_dir}: {err}"
                    ) from err
                try:
                    ingest_process = await self._ready_ingest_process()
                    spawned = await self._spawner.spawn(spec, containment.join_path, plan)
                except BaseException:
                    output.remove()
                    raise
            except BaseException:
                containment.kill()
                # Off the event loop, as in _supervise; the thread finishes the release
                # even if this task is cancelled again while it waits.
                await asyncio.to_thread(containment.release)
                raise
        except BaseException:
            self._release_slot(owner)
            raise
        finally:
            self._starting -= 1
            if self._starting == 0:
                self._idle.set()
        containment.attach(spawned.pid)
        job = _Job(
            job_id=job_id,
            spec=spec,
            owner=owner,
            containment=containment,
            pid=spawned.pid,
            pidfd=spawned.pidfd,
            exit_report=spawned.exit_report,
            log=output,
            started_at=time.time(),
            plan=plan,
            stdin=spawned.stdin,
        )
        self._jobs[job_id] = job
        self._usage.track(job_id, spawned.pid, containment)
        loop = asyncio.get_running_loop()
        pipes = [
            (
                fd,
                stream,
                functools.partial(self._on_output, loop, job, stream),
                functools.partial(self._pipe_closed, job, fd),
            )
            for fd, stream in ((spawned.stdout, Stream.STDOUT), (spawned.stderr, Stream.STDERR))
        ]
        if ingest_process is None:
            for fd, _stream, sink, on_eof in pipes:
                job.pipes[fd] = self._threads().add(fd, sink, on_eof)
        else:
            handles = ingest_process.add(
                job_id, job.log, pipes, functools.partial(self._published, job)
            )
            job.pipes.update((handle.fd, handle) for handle in handles)
        # A fresh context: the job outlives the RPC that started it, and its log lines
        # must not carry that RPC's identity and name.
        task = loop.create_task(
            self._supervise(job), name=f"job-{job_id}", context=contextvars.Context()
        )
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)
        status = job.snapshot()
        log.info(
            "job_started",
            job_id=job_id,
            owner=owner,
            command=spec.command,
            pid=job.pid,
            isolation=status.isolation,
        )
        self._plugins.job_started(status)
        return status

    # -- output --------------------------------------------------------------------------

    def _on_output(
        self, loop: asyncio.AbstractEventLoop, job: _Job, stream: Stream, data: bytes
    ) -> None:
        """One read of a job's pipe (up to the pipe's size), in the spool-writing thread."""
        job.log.write(stream, data)
        if not job.publish_pending:
            # One wake-up of the loop for any number of reads it has not caught up with.
            job.publish_pending = True
            loop.call_soon_threadsafe(self._publish, job)
        if self._observe_output:
            self._observer_slots.acquire()
            loop.call_soon_threadsafe(self._observe, job, stream, data)

    async def _ready_ingest_process(self) -> IngestProcess | None:
        """The ingest process, started if need be; None where the threads read the pipes
        (a plugin observes output chunks, or the process could not start)."""
        if self._observe_output:
            return None
        if self._ingest_process is None:
            self._ingest_process = IngestProcess(
                asyncio.get_running_loop(), PIPE_SIZE, self._spool_budget, self._threads
            )
        return self._ingest_process if await self._ingest_process.ready() else None

    def _threads(self) -> Ingest:
        if self._ingest is None:
            self._ingest = Ingest(asyncio.get_running_loop(), PIPE_SIZE)
        return self._ingest

    async def _drop(self, pipe: Pipe | RemotePipe) -> None:
        if isinstance(pipe, RemotePipe):
            assert self._ingest_process is not None
            await self._ingest_process.drop(pipe)
        else:
            await self._threads().drop(pipe)

    def _remove_output(self, job: _Job) -> None:
        job.log.remove()
        if self._ingest_process is not None:
            self._ingest_process.forget(job.job_id)

    def _publish(self, job: _Job) -> None:
        job.publish_pending = False  # first: a read after this point schedules again
        job.log.publish()
        self._published(job)

    def _published(self, job: _Job) -> None:
        """After new output was published: count it, and say so once if the log was cut."""
        self.output_bytes_read += job.log.payload_bytes - job.counted
        job.counted = job.log.payload_bytes
        if job.log.truncated and not job.cut_logged:
            job.cut_logged = True
            log.error(
                "job_output_cut",
                job_id=job.job_id,
                kept_bytes=job.log.kept_bytes,
                reason=job.log.cut_reason,
            )

    def _observe(self, job: _Job, stream: Stream, data: bytes) -> None:
        try:
            self._plugins.output_chunk(job.job_id, stream.label, data)
        finally:
            self._observer_slots.release()

    def _pipe_closed(self, job: _Job, fd: int) -> None:
        """The ingest threads have closed ``fd`` (end-of-file, or dropped)."""
        job.pipes.pop(fd, None)
        if not job.pipes:
            job.pipes_closed.set()

    def follow(
        self, job_id: str, offset: int = 0, follow: bool = True
    ) -> AsyncIterator[OutputChunk]:
        """Output of ``job_id`` from ``offset``; see :meth:`OutputLog.follow`."""
        return self._lookup(job_id).log.follow(offset, follow)

    # -- input ---------------------------------------------------------------------------

    async def write_input(self, job_id: str, chunks: AsyncIterator[InputChunk]) -> InputResult:
        """Copy ``chunks`` into the job's stdin; one writer at a time.

        Flow control: the next chunk is taken only when the previous one is wholly in the
        pipe, so the server holds at most one chunk per job and a slow reader slows the
        writer. Ends at ``eof`` (stdin closed), when ``chunks`` ends (stdin stays open for
        a later writer), or when the job closes its end or exits (EPIPE); a closed stdin
        takes nothing (``closed`` set). Raises FailedPrecondition when the job was started
        without stdin or another writer holds it.
        """
        job = self._lookup(job_id)
        if not job.spec.stdin:
            raise FailedPrecondition(
                f"job {job_id} was started without stdin (it reads /dev/null); start it"
                " with `-i` (StartJobRequest.stdin) to write to it"
            )
        if job.stdin < 0:  # closed by eof, by the job, or at its end: like a reader gone
            return InputResult(0, closed=True)
        if job.stdin_writer:
            raise FailedPrecondition(
                f"another client is writing to job {job_id}'s stdin; wait until it finishes"
            )
        job.stdin_writer = True
        written = 0
        try:
            async for chunk in chunks:
                view = memoryview(chunk.data)
                while view:
                    count = await self._write_some(job, view)
                    if count is None:
                        return InputResult(written, closed=True)
                    written += count
                    view = view[count:]
                if chunk.eof:
                    self._close_stdin(job)
                    return InputResult(written, closed=True)
            return InputResult(written, closed=job.stdin < 0)
        finally:
            job.stdin_writer = False

    async def _write_some(self, job: _Job, data: memoryview) -> int | None:
        """Bytes of ``data`` written once the pipe takes some; None when stdin closed."""
        while job.stdin >= 0:
            try:
                return os.write(job.stdin, data)
            except BlockingIOError:
                pass
            except OSError as err:  # EPIPE: the job's processes closed their end
                log.info("job_stdin_closed", job_id=job.job_id, reason=err.strerror)
                self._close_stdin(job)
                return None
            fd = job.stdin
            loop = asyncio.get_running_loop()
            job.stdin_wakeup = loop.create_future()
            loop.add_writer(fd, resolve_future, job.stdin_wakeup)
            try:
                await job.stdin_wakeup
            finally:
                job.stdin_wakeup = None
                if job.stdin == fd:
                    loop.remove_writer(fd)
        return None

    def _close_stdin(self, job: _Job) -> None:
        """Close the job's stdin (EOF for its reader); wake a writer blocked on it."""
        if job.stdin < 0:
            return
        asyncio.get_running_loop().remove_writer(job.stdin)
        os.close(job.stdin)
        job.stdin = -1
        if job.stdin_wakeup is not None:
            resolve_future(job.stdin_wakeup)

    # -- end of a job --------------------------------------------------------------------

    async def _supervise(self, job: _Job) -> None:
        """Wait for the main process, then end the job; it always ends, whatever fails."""
        code, status, report = os.CLD_KILLED, int(signal.SIGKILL), ContainmentReport()
        try:
            code, status = await self._reap(job)
            await self._settle(job)
            report = job.containment.report()
        except Exception:
            log.exception("job_supervision_failed", job_id=job.job_id)
        finally:
            # Still open only when reaping was cancelled (a shutdown giving up on a job).
            for fd in (job.pidfd, job.exit_report):
                if fd >= 0:
                    os.close(fd)
            job.pidfd = job.exit_report = -1
            self._close_stdin(job)
            for pipe in list(job.pipes.values()):
                await self._drop(pipe)
            try:
                # Off the event loop: removing a cgroup may wait for the kernel (EBUSY).
                await asyncio.to_thread(job.containment.release)
            except Exception:
                log.exception("containment_release_failed", job_id=job.job_id)
        self._finish(job, code, status, report)

    async def _reap(self, job: _Job) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(job.pidfd, resolve_future, exited)
        try:
            await exited
        finally:
            loop.remove_reader(job.pidfd)
        job.exited.set()
        # Look without reaping: while the zombie exists its pid (and process group id)
        # cannot be reused, so killing the leftovers cannot hit a stranger.
        # The pidfd said the process exited, so neither wait blocks.
        info = os.waitid(os.P_PID, job.pid, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222
        job.containment.kill()
        os.waitpid(job.pid, 0)  # noqa: ASYNC222
        os.close(job.pidfd)
        job.pidfd = -1
        # An isolated job's main process is its PID 1, which reports the command's status.
        reported = read_exit_report(job.exit_report)
        os.close(job.exit_report)
        job.exit_report = -1
        if reported is not None:
            return _from_wait_status(reported)
        if info is None:  # cannot happen after the pidfd fired; be explicit anyway
            return os.CLD_KILLED, int(signal.SIGKILL)
        return info.si_code, info.si_status

    async def _settle(self, job: _Job) -> None:
        """Wait until no process of the job remains and its pipes are drained (bounded)."""
        try:
            await asyncio.wait_for(job.containment.wait_empty(), SETTLE_TIMEOUT)
        except TimeoutError:
            log.error("job_processes_linger", job_id=job.job_id, containment=job.containment.name)
        try:
            await asyncio.wait_for(job.pipes_closed.wait(), PIPE_DRAIN_TIMEOUT)
        except TimeoutError:
            log.warning("job_pipes_held", job_id=job.job_id, reason="a process left the group")

    def _finish(self, job: _Job, code: int, status: int, report: ContainmentReport) -> None:
        job.exit = _exit_info(job, code, status, report)
        job.usage = report.usage
        job.ended_at = time.time()
        job.log.close()
        job.done.set()
        self._release_slot(job.owner)
        self._usage.finished(job.job_id)
        self._finished.setdefault(job.owner, collections.deque()).append(job.job_id)
        self._finished_count += 1
        final = job.snapshot()
        log.info(
            "job_exited",
            job_id=job.job_id,
            reason=job.exit.reason.value,
            exit_code=job.exit.exit_code,
            signal=job.exit.signal,
            duration=round(job.ended_at - job.started_at, 3),
        )
        self._plugins.on_exit(final)
        self._evict()

    def _release_slot(self, owner: str) -> None:
        self._active[owner] -= 1
        if not self._active[owner]:
            del self._active[owner]

    def _evict(self) -> None:
        """Drop finished jobs past ``retain_seconds``, then, while more than
        ``retain_finished`` are kept, the oldest of the owner who has the most."""
        cutoff = time.time() - self._retain_seconds
        for owner, ids in list(self._finished.items()):
            while ids and (self._jobs[ids[0]].ended_at or 0) <= cutoff:
                self._evict_oldest_of(owner)
        while self._finished_count > self._retain_finished:
            self._evict_oldest_of(max(self._finished, key=lambda o: len(self._finished[o])))

    def _evict_oldest_of(self, owner: str) -> None:
        ids = self._finished[owner]
        job = self._jobs.pop(ids.popleft())
        if not ids:
            del self._finished[owner]
        self._finished_count -= 1
        self._usage.forget(job.job_id)
        self._remove_output(job)

    # -- stop ----------------------------------------------------------------------------

    async def wait(self, job_id: str) -> JobStatus:
        job = self._lookup(job_id)
        await job.done.wait()
        return job.snapshot()

    async def stop(self, job_id: str, by: str, grace: float | None = None) -> StopResult:
        """SIGTERM every process of the job, then SIGKILL after ``grace`` seconds.

        Concurrent stops share one stop (the first caller's name and grace win); stopping a
        finished job answers so, without error.
        """
        job = self._lookup(job_id)
        if grace is not None and not 0 <= grace <= 3600:
            raise InvalidArgument(f"grace {grace} must be between 0 and 3600 seconds")
        if job.done.is_set():
            status = job.snapshot()
            return StopResult(status, True, False, f"job already finished ({describe_end(status)})")
        if job.stop_task is None:
            job.stopped_by = by
            job.stop_task = asyncio.ensure_future(
                self._stop(job, self.default_grace if grace is None else grace)
            )
            log.info("job_stop_requested", job_id=job_id, by=by, grace=grace)
        await asyncio.shield(job.stop_task)
        status = job.snapshot()
        return StopResult(status, False, job.escalated, describe_end(status))

    async def _stop(self, job: _Job, grace: float) -> None:
        """SIGTERM; SIGKILL (``escalated``) if the main process has not exited after
        ``grace`` (at least :data:`SIGTERM_MIN_SECONDS`); then wait for the job's end."""
        job.containment.signal(signal.SIGTERM)
        job.containment.signal(signal.SIGCONT)  # a stopped process must run to see SIGTERM
        try:
            # Once the main process is gone, the supervisor kills what is left of the job.
            wait = max(grace, SIGTERM_MIN_SECONDS)
            await asyncio.wait_for(asyncio.shield(job.exited.wait()), wait)
        except TimeoutError:
            job.escalated = True
            job.containment.kill()
            if job.pidfd >= 0:
                # The main process too, even if it left its containment: an isolated job's
                # PID 1 takes every process of its namespace with it.
                signal.pidfd_send_signal(job.pidfd, signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(job.done.wait()), KILL_TIMEOUT)
        except TimeoutError:
            log.error(
                "job_unkillable",
                job_id=job.job_id,
                pid=job.pid,
                containment=job.containment.name,
                waited=KILL_TIMEOUT,
            )

    # -- shutdown ------------------------------------------------------------------------

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop every job (grace, then kill), then remove every spool file."""
        self._closing = True
        await self._idle.wait()
        running = [j for j in self._jobs.values() if not j.done.is_set()]
        await asyncio.gather(
            *(self.stop(j.job_id, by="server-shutdown", grace=grace) for j in running)
        )
        if self._supervisors:
            # Bounded: a process stuck in the kernel must not keep the server from exiting.
            _done, stuck = await asyncio.wait(self._supervisors, timeout=KILL_TIMEOUT)
            for task in stuck:
                log.error("job_unkillable_at_shutdown", task=task.get_name(), waited=KILL_TIMEOUT)
                task.cancel()
        for job in self._jobs.values():
            self._remove_output(job)
        await self._usage.close()
        self._jobs.clear()
        self._finished.clear()
        self._finished_count = 0
        self._spawner.close()
        if self._ingest_process is not None:
            self._ingest_process.close()
            self._ingest_process = None
        if self._ingest is not None:
            self._ingest.close()
            self._ingest = None

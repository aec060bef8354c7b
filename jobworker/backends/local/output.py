"""The output plumbing of the local engine: from a job's pipes to its spool and followers.

Each job's stdout and stderr are read by the ingest process
(:mod:`jobworker.backends.local.ingest_process`), or, when a plugin observes output chunks
(or that process could not start), by threads in this process
(:mod:`jobworker.backends.local.ingest`). Either way the bytes land in the job's
:class:`OutputLog` and are published to its followers on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterable
from pathlib import Path

import attrs
import structlog

from jobworker.backends.local.handover import HandedOver, take_over
from jobworker.backends.local.ingest import Ingest, Pipe
from jobworker.backends.local.ingest_process import IngestProcess, RemotePipe
from jobworker.backends.local.job import Job
from jobworker.backends.local.outputlog import OutputLog
from jobworker.backends.local.spawn import PIPE_SIZE
from jobworker.backends.local.spoolwriter import SpoolBudget, SpoolState, scan
from jobworker.errors import FailedPrecondition
from jobworker.hooks.host import Plugins
from jobworker.model import Stream

log = structlog.get_logger("jobworker.backends.local.output")

#: Reads handed to ``jobworker_output_chunk`` observers and not yet seen by them: the
#: spool-writing thread waits beyond this, so a slow observer bounds memory, never loses a byte.
OBSERVER_BACKLOG = 8


class JobOutput:
    """Spools, readers and counters of every job's output. Runs on the event loop's thread,
    except :meth:`_on_output`, which the reading threads call."""

    def __init__(
        self,
        plugins: Plugins,
        spool_dir: Path,
        max_output_bytes: int | None,
        max_spool_bytes: int | None,
        live: bool = False,
        max_spool_bytes_per_client: int | None = None,
    ) -> None:
        """``live``: ``serve --live-restore`` (see :meth:`take_over`)."""
        self._plugins = plugins
        self._spool_dir = spool_dir
        self._live = live
        #: Set once the pipes of adopted jobs are back (:meth:`take_over`), or at once.
        self.restored = asyncio.Event()
        self.restored.set()
        self._observe_output = plugins.has_impl("jobworker_output_chunk")
        self._observer_slots = threading.BoundedSemaphore(OBSERVER_BACKLOG)
        self._max_output_bytes = max_output_bytes
        self._spool_budget = SpoolBudget(max_spool_bytes, max_spool_bytes_per_client)
        #: The ingest threads in this process: they read every pipe when a plugin observes
        #: output chunks, else the pipes of a lost ingest process.
        self._ingest: Ingest | None = None
        #: The ingest process, when no plugin observes chunks.
        self._ingest_process: IngestProcess | None = None
        #: Bytes of output read from every job so far, kept or not (for the metrics plugin:
        #: an int, read whole from its thread).
        self.bytes_read = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def budget(self) -> SpoolBudget:
        return self._spool_budget

    @property
    def max_output_bytes(self) -> int | None:
        return self._max_output_bytes

    @property
    def ingest_pid(self) -> int | None:
        """The ingest process's pid while one runs (None: the pipes are read in here)."""
        return None if self._ingest_process is None else self._ingest_process.pid

    def open_log(self, job_id: str, owner: str) -> OutputLog:
        """A new job's spool, on ``owner``'s share of the budget; FailedPrecondition when
        it cannot be created."""
        try:
            return OutputLog(
                self._spool_dir / f"{job_id}.out",
                max_bytes=self._max_output_bytes,
                budget=self._spool_budget.account(owner),
            )
        except OSError as err:
            raise FailedPrecondition(
                f"cannot create the job's output spool in {self._spool_dir}: {err}"
            ) from err

    async def ready_ingest_process(self) -> IngestProcess | None:
        """The ingest process, started if need be; None where the threads read the pipes
        (a plugin observes output chunks, or the process could not start)."""
        if self._observe_output:
            return None
        return self._ingest_process if await self._helper().ready() else None

    def _helper(self) -> IngestProcess:
        if self._ingest_process is None:
            self._ingest_process = IngestProcess(
                asyncio.get_running_loop(),
                PIPE_SIZE,
                self._spool_budget,
                self._threads,
                live=self._spool_dir if self._live else None,
            )
        return self._ingest_process

    def connect(
        self, job: Job, stdout: int, stderr: int, ingest_process: IngestProcess | None
    ) -> None:
        """Have the job's pipes read into its log, by ``ingest_process`` or the threads."""
        streams = ((Stream.STDOUT, stdout), (Stream.STDERR, stderr))
        self._connect(job, streams, ingest_process)

    def _connect(
        self,
        job: Job,
        streams: Iterable[tuple[Stream, int]],
        ingest_process: IngestProcess | None,
        resume: SpoolState | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        pipes = [
            (
                fd,
                stream,
                functools.partial(self._on_output, loop, job, stream),
                functools.partial(self._pipe_closed, job, fd),
            )
            for stream, fd in streams
        ]
        if not pipes:
            job.pipes_closed.set()
        elif ingest_process is None:
            for fd, _stream, sink, on_eof in pipes:
                job.pipes[fd] = self._threads().add(fd, sink, on_eof)
        else:
            published = functools.partial(self._published, job)
            handles = ingest_process.add(job.job_id, job.log, pipes, published, resume, job.stdin)
            job.pipes.update((handle.fd, handle) for handle in handles)
            if job.stdin >= 0:
                job.on_stdin_closed = functools.partial(ingest_process.stdin_closed, job.job_id)

    # -- live restore --------------------------------------------------------------------

    def adopt_finished(self, job: Job) -> None:
        """Count the complete log of a job that ended before this server started."""
        self._published(job)
        if not self._observe_output:
            self._helper().register(
                job.job_id, job.log, functools.partial(self._published, job), job.log.size
            )

    def take_over(self, jobs: list[Job]) -> None:
        """Get the running ``jobs``' pipes back from the helper the previous server left,
        and have them read on from where it stopped; in a task, so that the server answers
        meanwhile (:attr:`restored` is set once done)."""
        self.restored.clear()
        task = asyncio.get_running_loop().create_task(self._take_over(jobs), name="take-over")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _take_over(self, jobs: list[Job]) -> None:
        try:
            try:
                handed = await take_over(self._spool_dir, self.ingest_pid)
            except (OSError, TimeoutError, ValueError, KeyError) as err:
                log.error("ingest_take_over_failed", error=str(err))
                handed = None
            if handed is None and jobs:
                log.warning("ingest_process_gone", jobs=len(jobs))
            ingest_process = await self.ready_ingest_process() if jobs else None
            for job in jobs:
                found = None if handed is None else handed.pop(job.job_id, None)
                await self._resume(job, found, ingest_process)
            for left in (handed or {}).values():  # logs of jobs not adopted
                left.close()
        finally:
            self.restored.set()

    async def _resume(
        self, job: Job, found: HandedOver | None, ingest_process: IngestProcess | None
    ) -> None:
        seen: int | None = None
        cut: str | None = "the loss of the ingest process while no server ran"
        if found is not None:
            seen, cut = found.seen, found.cut
        # Off the loop: a long log has many records to count.
        state = await asyncio.to_thread(scan, job.log.fd, seen, cut)
        # The marks up to what adoption scanned are the log's already.
        job.log.adopt(attrs.evolve(state, marks=tuple(m for m in state.marks if m > job.log.size)))
        self._published(job)
        if found is not None and found.stdin >= 0:
            job.stdin = found.stdin
        pipes = () if found is None else found.pipes
        self._connect(job, pipes, ingest_process, state)

    def _on_output(
        self, loop: asyncio.AbstractEventLoop, job: Job, stream: Stream, data: bytes
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

    def _threads(self) -> Ingest:
        if self._ingest is None:
            self._ingest = Ingest(asyncio.get_running_loop(), PIPE_SIZE)
        return self._ingest

    async def drop(self, pipe: Pipe | RemotePipe) -> None:
        """Stop reading ``pipe`` and close it, whoever reads it. After :meth:`close` (a
        job whose clean-up a shutdown cancelled), whoever read it has closed it: never
        a new reader that never knew the pipe."""
        if isinstance(pipe, RemotePipe):
            if self._ingest_process is not None:
                await self._ingest_process.drop(pipe)
        elif self._ingest is not None:
            await self._ingest.drop(pipe)

    def remove(self, job: Job) -> None:
        """Delete the job's spooled output (it is evicted, or the server stops)."""
        job.log.remove()
        if self._ingest_process is not None:
            self._ingest_process.forget(job.job_id)

    def _publish(self, job: Job) -> None:
        job.publish_pending = False  # first: a read after this point schedules again
        job.log.publish()
        self._published(job)

    def _published(self, job: Job) -> None:
        """After new output was published: count it, and say so once if the log was cut."""
        self.bytes_read += job.log.payload_bytes - job.counted
        job.counted = job.log.payload_bytes
        if job.log.truncated and not job.cut_logged:
            job.cut_logged = True
            log.error(
                "job_output_cut",
                job_id=job.job_id,
                kept_bytes=job.log.kept_bytes,
                reason=job.log.cut_reason,
            )

    def _observe(self, job: Job, stream: Stream, data: bytes) -> None:
        try:
            self._plugins.output_chunk(job.job_id, stream.label, data)
        finally:
            self._observer_slots.release()

    def _pipe_closed(self, job: Job, fd: int) -> None:
        """The reader has closed ``fd`` (end-of-file, or dropped)."""
        job.pipes.pop(fd, None)
        if not job.pipes:
            job.pipes_closed.set()

    def close(self, detach: bool = False) -> None:
        """Stop the ingest process and threads (at shutdown, every job gone); ``detach``:
        leave the ingest process reading for the next server (live restore)."""
        for task in self._tasks:
            task.cancel()
        if self._ingest_process is not None:
            self._ingest_process.close(detach)
            self._ingest_process = None
        if self._ingest is not None:
            self._ingest.close()
            self._ingest = None

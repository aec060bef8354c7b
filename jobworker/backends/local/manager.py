"""The job manager: starts, tracks, streams and stops jobs, all on one asyncio loop.

Jobs live in memory by id, retained after their end until evicted; how clients share them
(a quota per owner, eviction of the biggest owner's oldest) is :mod:`.table`.

A job is over when its main process has exited, every other process of its containment
has been killed and is gone, and both output pipes are drained (:mod:`.ending`): only then
do followers see end-of-stream and plugins see ``on_exit``. The job's output goes through
:mod:`.output`, its stdin through :mod:`.stdin`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import structlog

from jobworker.backends.local import ending, restore, stdin
from jobworker.backends.local.containment import Containment, ProcessGroup
from jobworker.backends.local.isolation import IsolationPlan, enforced_limits
from jobworker.backends.local.job import Job, isolation_summary
from jobworker.backends.local.output import JobOutput
from jobworker.backends.local.record import (
    EXIT_SUFFIX,
    JobEnd,
    JobRecord,
    ProcessIdentity,
    remove_files,
)
from jobworker.backends.local.sampling import UsageSampler
from jobworker.backends.local.spawn import Spawned, Spawner
from jobworker.backends.local.table import JobTable
from jobworker.errors import (
    FailedPrecondition,
    InvalidArgument,
    JobworkerError,
    job_not_found,
)
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.model import (
    ExitInfo,
    InputChunk,
    InputResult,
    JobStatus,
    OutputChunk,
    ResourceUsage,
    StopResult,
    describe_end,
    new_job_id,
)
from jobworker.usage import JobUsage, UsageSample

log = structlog.get_logger("jobworker.backends.local.manager")


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
        max_spool_bytes_per_client: int | None = None,
        live_restore: bool = False,
    ) -> None:
        """``live_restore``: keep a record of each job beside its spool, leave jobs
        running at :meth:`shutdown`, and adopt those of the previous server
        (:meth:`restore`)."""
        self._plugins = plugins
        self._live = live_restore
        self._spool_dir = spool_dir
        self.default_grace = default_grace
        self._table = JobTable(
            max_running, max_running_per_client or max_running, retain_finished, retain_seconds
        )
        self._supervisors: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._output = JobOutput(
            plugins,
            spool_dir,
            max_output_bytes,
            max_spool_bytes,
            live=live_restore,
            max_spool_bytes_per_client=max_spool_bytes_per_client,
        )
        self._spawner = Spawner()
        self._usage = UsageSampler()
        #: Where job output is spooled (the metrics plugin reports its size and free space).
        self.spool_dir = spool_dir

    @property
    def output_bytes_read(self) -> int:
        """Bytes of output read from every job so far, kept or not (for the metrics plugin)."""
        return self._output.bytes_read

    # -- queries -------------------------------------------------------------------------

    def _lookup(self, job_id: str) -> Job:
        job = self._table.jobs.get(job_id)
        if job is None:
            raise job_not_found(job_id)
        return job

    def find(self, job_id: str) -> JobStatus | None:
        job = self._table.jobs.get(job_id)
        return None if job is None else job.snapshot()

    def get(self, job_id: str) -> JobStatus:
        return self._lookup(job_id).snapshot()

    def list(self) -> list[JobStatus]:
        self._evict()
        return [job.snapshot() for job in self._table.jobs.values()]

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
            if (job := self._table.jobs.get(j)) is not None
        ]

    @property
    def ingest_pid(self) -> int | None:
        """The ingest process's pid while one runs (None: the pipes are read in here)."""
        return self._output.ingest_pid

    @property
    def running(self) -> int:
        return self._table.running

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
        except BaseException as err:
            # Cancelled (the client went away mid-start) or a bug: plugins must still learn
            # that the job never ran, or what they hold for it (its uid) is never released.
            lost = JobworkerError(f"the start did not complete ({type(err).__name__})")
            self._plugins.start_refused(job_id, spec, owner, lost)
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
        self._table.check_room(owner)
        spec = self._plugins.pre_spawn(job_id, spec, owner)
        self._table.admit(owner)
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
                output = self._output.open_log(job_id, owner)
                exit_report = self._spool_dir / (job_id + EXIT_SUFFIX) if self._live else None
                try:
                    ingest_process = await self._output.ready_ingest_process()
                    spawned = await self._spawner.spawn(
                        spec, containment.join_path, plan, exit_report
                    )
                    started_at = time.time()
                    record = None
                    if self._live:
                        record = self._record(
                            job_id, spec, owner, containment, plan, spawned, started_at
                        )
                except BaseException:
                    output.remove()
                    remove_files(self._spool_dir, job_id)
                    raise
            except BaseException:
                containment.kill()
                # Off the event loop, as in _supervise; the thread finishes the release
                # even if this task is cancelled again while it waits.
                await asyncio.to_thread(containment.release)
                raise
        except BaseException:
            self._table.release(owner)
            raise
        finally:
            self._table.starting -= 1
            if self._table.starting == 0:
                self._idle.set()
        containment.attach(spawned.pid)
        user, uid, isolation = isolation_summary(plan)
        job = Job(
            job_id=job_id,
            spec=spec,
            owner=owner,
            containment=containment,
            pid=spawned.pid,
            pidfd=spawned.pidfd,
            exit_report=spawned.exit_report,
            log=output,
            started_at=started_at,
            user=user,
            uid=uid,
            isolation=isolation,
            enforced=enforced_limits(containment.applied, plan),
            stdin=spawned.stdin,
            record=record,
        )
        self._table.jobs[job_id] = job
        self._usage.track(job_id, spawned.pid, containment, spawned.helpers)
        self._output.connect(job, spawned.stdout, spawned.stderr, ingest_process)
        self._watch(job)
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

    def _record(
        self,
        job_id: str,
        spec: JobSpec,
        owner: str,
        containment: Containment,
        plan: IsolationPlan | None,
        spawned: Spawned,
        started_at: float,
    ) -> JobRecord:
        """Write the record of a job that just started (live restore): before anyone
        hears of the job, so that no job a client saw lacks one. A failure kills it."""
        user, uid, isolation = isolation_summary(plan)
        try:
            record = JobRecord(
                job_id=job_id,
                owner=owner,
                spec=spec,
                started_at=started_at,
                process=ProcessIdentity.of(spawned.pid),
                containment=containment.name,
                applied_limits=containment.applied,
                user=user,
                uid=uid,
                isolation=isolation,
                spool=f"{job_id}.out",
                exit_report=job_id + EXIT_SUFFIX,
                max_output_bytes=self._output.max_output_bytes,
            )
            record.write(self._spool_dir)
        except OSError as err:
            spawned.abandon()
            raise FailedPrecondition(
                f"cannot write the job's record in {self._spool_dir}: {err.strerror or err}"
            ) from err
        return record

    def _watch(self, job: Job) -> None:
        """Supervise ``job`` until it ends."""
        # A fresh context: the job outlives the RPC that started it, and its log lines
        # must not carry that RPC's identity and name.
        task = asyncio.get_running_loop().create_task(
            self._supervise(job), name=f"job-{job.job_id}", context=contextvars.Context()
        )
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)

    # -- live restore --------------------------------------------------------------------

    def restore(self) -> None:
        """Adopt the jobs the previous server left in the spool directory (see
        :mod:`.restore`). Called once, before the server listens; waits on no job: their
        output pipes come back from the previous ingest process in a task of their own."""
        running = []
        for record in restore.read_records(self._spool_dir):
            try:
                job = restore.adopt(record, self._spool_dir, self._plugins, self._output.budget)
            except OSError as err:  # one job the system will not let us read: not the rest
                log.error("job_adoption_failed", job_id=record.job_id, error=str(err))
                continue
            if job is None:
                remove_files(self._spool_dir, record.job_id)
                continue
            if job.done.is_set():
                self._output.adopt_finished(job)
                self._table.add_finished(job)
                continue
            running.append(job)
            self._table.add_running(job)
            if job.pidfd >= 0:
                self._usage.track(job.job_id, job.pid, job.containment)
            self._watch(job)
        self._output.take_over(running)
        log.info(
            "jobs_restored",
            running=len(running),
            finished=self._table.finished,
            lost=sum(1 for job in running if job.lost is not None),
        )
        self._evict()

    def _detach(self) -> None:
        """Leave every job running for the next server (``--live-restore``): their
        records, spools and exit reports stay; followers get UNAVAILABLE."""
        for job in self._table.jobs.values():
            job.detached = True
            job.log.detach()
        for task in self._supervisors:
            task.cancel()

    # -- output and input ----------------------------------------------------------------

    def follow(
        self, job_id: str, offset: int = 0, follow: bool = True
    ) -> AsyncIterator[OutputChunk]:
        """Output of ``job_id`` from ``offset``; see :meth:`OutputLog.follow`."""
        return self._lookup(job_id).log.follow(offset, follow)

    async def output_redirect(
        self, job_id: str, client_cert: bytes, client: str, max_streams: int | None
    ) -> None:
        """Nothing is nearer the job than this server: its output goes through :meth:`follow`."""
        return None

    async def write_input(self, job_id: str, chunks: AsyncIterator[InputChunk]) -> InputResult:
        """Copy ``chunks`` into the job's stdin; see :func:`.stdin.write_input`."""
        return await stdin.write_input(self._lookup(job_id), chunks)

    # -- end of a job --------------------------------------------------------------------

    async def _supervise(self, job: Job) -> None:
        """Wait for the job's end (:func:`.ending.supervise`), then record it."""
        self._finish(job, *await ending.supervise(job, self._output))

    def _finish(self, job: Job, end: ExitInfo, usage: ResourceUsage | None) -> None:
        job.exit = end
        job.usage = usage
        job.ended_at = time.time()
        job.log.close()
        if job.record is not None:
            self._record_end(job, job.record)
        job.done.set()
        self._table.release(job.owner)
        self._usage.finished(job.job_id)
        self._table.add_finished(job)
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

    def _record_end(self, job: Job, record: JobRecord) -> None:
        """Rewrite the record of a job that ended, so the next server shows its end."""
        assert job.exit is not None and job.ended_at is not None
        end = JobEnd(job.exit, job.ended_at, job.usage, job.log.payload_bytes, job.log.cut_reason)
        job.record = attrs.evolve(record, end=end)
        try:
            job.record.write(self._spool_dir)
        except OSError as err:
            # The next server reads the exit report instead; only the usage is lost.
            log.warning("job_record_not_updated", job_id=job.job_id, error=str(err))

    def _remove(self, job: Job) -> None:
        """Delete everything kept of an evicted job: output, record, exit report."""
        self._output.remove(job)
        if job.record is not None:
            remove_files(self._spool_dir, job.job_id)

    def _evict(self) -> None:
        """Drop the finished jobs :meth:`.JobTable.evict` picks, and their files."""
        for job in self._table.evict(time.time()):
            self._usage.forget(job.job_id)
            self._remove(job)

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
                ending.terminate(job, self.default_grace if grace is None else grace)
            )
            log.info("job_stop_requested", job_id=job_id, by=by, grace=grace)
        await asyncio.shield(job.stop_task)
        status = job.snapshot()
        return StopResult(status, False, job.escalated, describe_end(status))

    # -- shutdown ------------------------------------------------------------------------

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop every job (grace, then kill), then remove every spool file; with
        ``live_restore``, leave them all for the next server instead."""
        self._closing = True
        await self._idle.wait()
        if self._live:
            self._detach()
        running = (
            [] if self._live else [j for j in self._table.jobs.values() if not j.done.is_set()]
        )
        await asyncio.gather(
            *(self.stop(j.job_id, by="server-shutdown", grace=grace) for j in running)
        )
        if self._supervisors:
            # Bounded: a process stuck in the kernel must not keep the server from exiting.
            _done, stuck = await asyncio.wait(self._supervisors, timeout=ending.KILL_TIMEOUT)
            for task in stuck:
                log.error(
                    "job_unkillable_at_shutdown", task=task.get_name(), waited=ending.KILL_TIMEOUT
                )
                task.cancel()
        for job in self._table.jobs.values():
            if not self._live:
                self._remove(job)
        await self._usage.close()
        self._table.clear()
        self._spawner.close()
        self._output.close(detach=self._live)

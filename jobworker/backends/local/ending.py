"""How a local job ends: its main process reaped, what is left killed, its pipes drained;
and how a stop gets it there (SIGTERM, then SIGKILL after the grace period).

A job is over when its main process has exited, every other process of its containment
has been killed and is gone, and both output pipes are drained (bounded by
:data:`SETTLE_TIMEOUT` and :data:`PIPE_DRAIN_TIMEOUT`). The job manager then records the
end (:meth:`JobManager._finish <jobworker.backends.local.manager.JobManager>`).
"""

from __future__ import annotations

import asyncio
import os
import signal

import structlog

from jobworker.backends.local.containment import ContainmentReport
from jobworker.backends.local.job import Job
from jobworker.backends.local.output import JobOutput
from jobworker.backends.local.spawn import read_exit_report, resolve_future
from jobworker.backends.local.stdin import close_stdin
from jobworker.model import ExitInfo, ResourceUsage, TerminationReason

log = structlog.get_logger("jobworker.backends.local.ending")

#: After the processes are gone, how long pipes may stay open (held by a process that left
#: a process group, which only a cgroup can track) before the server closes them.
PIPE_DRAIN_TIMEOUT = 2.0
#: How long killed processes may take to disappear (one stuck in uninterruptible IO)
#: before the job ends anyway, with an error log naming what is left.
SETTLE_TIMEOUT = 5.0
#: After SIGKILL, how long a stop waits for the job to end before it gives up waiting.
KILL_TIMEOUT = SETTLE_TIMEOUT + PIPE_DRAIN_TIMEOUT + 1.0
#: The least time SIGTERM gets before SIGKILL, even with grace 0: a process that dies of
#: SIGTERM at once is not killed (nor reported ``escalated``). An isolated job's PID 1
#: needs the moment to report the command's status before SIGKILL takes it too.
SIGTERM_MIN_SECONDS = 0.25


async def supervise(job: Job, output: JobOutput) -> tuple[ExitInfo, ResourceUsage | None]:
    """Wait for the main process, then clean up; it always returns how the job ended and
    its usage, whatever fails. A job :attr:`~Job.detached` (live restore) is left as it is
    when this is cancelled."""
    code, status, report = os.CLD_KILLED, int(signal.SIGKILL), ContainmentReport()
    try:
        code, status = await _reap(job)
        # An adopted job's pipes arrive with the previous ingest process's hand-over.
        await output.restored.wait()
        await _settle(job)
        report = job.containment.report()
    except Exception:
        log.exception("job_supervision_failed", job_id=job.job_id)
    except BaseException:
        if not job.detached:
            await _release(job, output)
        raise
    await _release(job, output)
    return exit_info(job, code, status, report), report.usage


async def _release(job: Job, output: JobOutput) -> None:
    # Still open only when reaping was cancelled (a shutdown giving up on a job).
    for fd in (job.pidfd, job.exit_report):
        if fd >= 0:
            os.close(fd)
    job.pidfd = job.exit_report = -1
    close_stdin(job)
    for pipe in list(job.pipes.values()):
        await output.drop(pipe)
    try:
        # Off the event loop: removing a cgroup may wait for the kernel (EBUSY).
        await asyncio.to_thread(job.containment.release)
    except Exception:
        log.exception("containment_release_failed", job_id=job.job_id)


async def _reap(job: Job) -> tuple[int, int]:
    if job.pidfd >= 0:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(job.pidfd, resolve_future, exited)
        try:
            await exited
        finally:
            loop.remove_reader(job.pidfd)
    job.exited.set()
    if not job.child:
        return _reap_adopted(job)
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


def _reap_adopted(job: Job) -> tuple[int, int]:
    """An adopted job's main process is init's child now: its exit report alone says how
    the command ended. Without one the job is ``lost``, unless a stop killed it."""
    job.containment.kill()
    if job.pidfd >= 0:
        os.close(job.pidfd)
        job.pidfd = -1
    reported = read_exit_report(job.exit_report)
    os.close(job.exit_report)
    job.exit_report = -1
    if reported is not None:
        job.lost = None  # whatever adoption found, the job's end is known
        return _from_wait_status(reported)
    if not job.escalated and job.lost is None:
        job.lost = "its first process ended without reporting the command's exit status"
    return os.CLD_KILLED, int(signal.SIGKILL)


async def _settle(job: Job) -> None:
    """Wait until no process of the job remains and its pipes are drained (bounded)."""
    try:
        await asyncio.wait_for(job.containment.wait_empty(), SETTLE_TIMEOUT)
    except TimeoutError:
        log.error("job_processes_linger", job_id=job.job_id, containment=job.containment.name)
    try:
        await asyncio.wait_for(job.pipes_closed.wait(), PIPE_DRAIN_TIMEOUT)
    except TimeoutError:
        log.warning("job_pipes_held", job_id=job.job_id, reason="a process left the group")


def _from_wait_status(raw: int) -> tuple[int, int]:
    """``waitid``'s (si_code, si_status) for a raw ``wait`` status."""
    if os.WIFSIGNALED(raw):
        code = os.CLD_DUMPED if os.WCOREDUMP(raw) else os.CLD_KILLED
        return code, os.WTERMSIG(raw)
    return os.CLD_EXITED, os.WEXITSTATUS(raw)


def exit_info(job: Job, code: int, status: int, report: ContainmentReport) -> ExitInfo:
    """How the job ended, from ``waitid``'s (si_code, si_status) and its containment."""
    killed = code in (os.CLD_KILLED, os.CLD_DUMPED)
    exit_code = None if killed else status
    sig = status if killed else None
    # The OOM killer takes a job's first process too (memory.oom.group): no report then.
    if job.lost is not None and not job.escalated and not report.oom_killed:
        log.error("job_lost", job_id=job.job_id, reason=job.lost)
        return ExitInfo(reason=TerminationReason.LOST, stopped_by=job.stopped_by)
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


async def terminate(job: Job, grace: float) -> None:
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

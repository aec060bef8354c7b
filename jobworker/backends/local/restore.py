"""Live restore: the jobs a previous server left running, adopted from their records.

A server started with ``--live-restore`` keeps a record per job (:mod:`.record`) beside
its spool, and leaves its jobs running when it stops or dies. The next one reads every
record of the run directory before it listens and, for each, trusts only what it can
prove from the running system:

* a job that had ended comes back as it ended (status, exit, output), within the
  retention bounds;
* a running job is adopted when its first process is still the recorded one (pid, start
  time, boot: :func:`.record.identify`, checked while a pidfd pins it), its containment
  still exists (a containment plugin adopts it, ``jobworker_limits_restore``), and its
  spool and exit report are there. Its output pipes come back from the previous ingest
  process (:meth:`.output.JobOutput.take_over`);
* otherwise it is never adopted blindly: whatever of it can be proven its own (its
  cgroup, a process that is still the recorded one) is killed, and it ends ``lost`` with
  the reason in the log -- unless its exit report says how it ended, as for a job that
  exited while no server ran: then that is its end.

Nothing here waits on a job: the reads are of small files and ``/proc``; a job's end is
awaited by its supervisor, as for any job.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import structlog

from jobworker.backends.local.containment import Containment, Ended, ProcessGroup
from jobworker.backends.local.job import Job
from jobworker.backends.local.outputlog import OutputLog
from jobworker.backends.local.record import (
    RECORD_SUFFIX,
    JobRecord,
    RecordError,
    identify,
)
from jobworker.backends.local.spoolwriter import SpoolBudget, scan
from jobworker.errors import JobworkerError
from jobworker.hooks.host import Plugins

log = structlog.get_logger("jobworker.backends.local.restore")

#: The containment name of a job in its process group (no containment plugin).
PROCESS_GROUP = "process-group"


def read_records(directory: Path) -> list[JobRecord]:
    """Every usable record of ``directory``, oldest job first; each one refused is logged."""
    records = []
    for path in directory.glob("*" + RECORD_SUFFIX):
        try:
            record = JobRecord.read(path)
        except RecordError as err:
            log.error("job_record_refused", error=str(err), consequence="the job is not adopted")
            continue
        if record.file_name != path.name:
            log.error(
                "job_record_refused",
                error=f"record {path} names job {record.job_id!r}",
                consequence="the job is not adopted",
            )
            continue
        records.append(record)
    return sorted(records, key=lambda r: r.started_at)


def adopt(record: JobRecord, directory: Path, plugins: Plugins, budget: SpoolBudget) -> Job | None:
    """The job ``record`` describes, adopted as far as it can be proven (see the module
    docstring); None when its output is gone with it (a finished job: nothing to show)."""
    output = _open_log(record, directory, budget)
    end = record.end
    if end is not None:
        if output is None:
            log.warning("job_record_dropped", job_id=record.job_id, reason="its spool is gone")
            return None
        output.adopt(scan(output.fd, end.output_seen, end.output_cut))
        output.close()
        job = _job(record, output, Ended(record.containment, record.applied_limits), -1, -1)
        job.exit, job.ended_at, job.usage = end.exit, end.ended_at, end.usage
        job.done.set()
        job.exited.set()
        return job
    lost: list[str] = []
    pidfd = _open_process(record, lost)
    containment = _containment(record, plugins, pidfd >= 0, lost)
    try:
        exit_report = os.open(directory / record.exit_report, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        exit_report = -1
        lost.append(f"its exit report is unreadable ({err.strerror})")
    if output is None:
        lost.append("its spool is gone")
        output = OutputLog(directory / record.spool, max_bytes=record.max_output_bytes)
        output.cut("the loss of its spool file while no server ran")
    else:
        # What is spooled so far, at once: a follower resuming at its offset must find it
        # (the previous ingest process may still be writing; its hand-over says the rest).
        output.adopt(scan(output.fd, None, None))
    if exit_report < 0:
        exit_report = os.memfd_create("jobworker-exit", os.MFD_CLOEXEC)
    job = _job(record, output, containment, pidfd, exit_report)
    if lost:
        job.lost = "; ".join(lost)
        # Only what is proven the job's own: a cgroup the plugin adopted, the recorded
        # process behind a pidfd. A reused pid is never signalled.
        containment.kill()
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        log.warning("job_not_adopted", job_id=record.job_id, reason=job.lost)
    return job


def _open_log(record: JobRecord, directory: Path, budget: SpoolBudget) -> OutputLog | None:
    try:
        return OutputLog(
            directory / record.spool,
            max_bytes=record.max_output_bytes,
            budget=budget.account(record.owner),
            existing=True,
        )
    except FileNotFoundError:
        return None


def _open_process(record: JobRecord, lost: list[str]) -> int:
    """A pidfd of the job's first process if it is still the recorded one, else -1 (why
    in ``lost``: only if it is not gone, since a process that ended left its report)."""
    identity = record.process
    try:
        pidfd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return -1
    why = identify(identity)
    if why is None:
        return pidfd
    os.close(pidfd)
    lost.append(why)
    return -1


def _containment(record: JobRecord, plugins: Plugins, alive: bool, lost: list[str]) -> Containment:
    """The job's containment, adopted by the plugin that made it; one that cannot be is
    replaced by one that holds nothing (the job is then lost)."""
    name = record.containment
    if name == PROCESS_GROUP:
        group = ProcessGroup()
        if alive:  # the group id is the first process's pid: a reused one is a stranger's
            group.attach(record.process.pid)
        return group
    try:
        adopted = plugins.limits_restore(record.job_id, name, record.applied_limits)
    except JobworkerError as err:
        lost.append(str(err))
        return Ended(name, record.applied_limits)
    if adopted is None:
        lost.append(f"no plugin loaded adopts its containment {name} (the same --plugin options?)")
        return Ended(name, record.applied_limits)
    adopted.attach(record.process.pid)
    return adopted


def _job(
    record: JobRecord, output: OutputLog, containment: Containment, pidfd: int, exit_report: int
) -> Job:
    return Job(
        job_id=record.job_id,
        spec=record.spec,
        owner=record.owner,
        containment=containment,
        pid=record.process.pid,
        pidfd=pidfd,
        exit_report=exit_report,
        log=output,
        started_at=record.started_at,
        user=record.user,
        uid=record.uid,
        isolation=record.isolation,
        child=False,
        record=record,
    )

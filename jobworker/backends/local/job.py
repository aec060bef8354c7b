"""One job as the local engine holds it: its processes, pipes, output log and how it ended.

Mutable, and touched only on the event loop's thread (the ingest threads reach it only
through callbacks scheduled there, except for the output log, which has its own lock).
Plugins and clients never see it: :meth:`Job.snapshot` is what leaves the engine.
"""

from __future__ import annotations

import asyncio
import os

import attrs

from jobworker.backends.local.containment import Containment
from jobworker.backends.local.ingest import Pipe
from jobworker.backends.local.ingest_process import RemotePipe
from jobworker.backends.local.isolation import IsolationPlan
from jobworker.backends.local.outputlog import OutputLog
from jobworker.jobspec import JobSpec
from jobworker.model import ExitInfo, JobState, JobStatus, ResourceUsage


@attrs.define(eq=False)
class Job:
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
    counted: int = 0  # of its output, bytes added to JobOutput.bytes_read
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

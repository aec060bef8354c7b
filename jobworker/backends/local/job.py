"""One job as the local engine holds it: its processes, pipes, output log and how it ended.

Mutable, and touched only on the event loop's thread (the ingest threads reach it only
through callbacks scheduled there, except for the output log, which has its own lock).
Plugins and clients never see it: :meth:`Job.snapshot` is what leaves the engine.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import attrs

from jobworker.backends.local.containment import Containment
from jobworker.backends.local.ingest import Pipe
from jobworker.backends.local.ingest_process import RemotePipe
from jobworker.backends.local.isolation import IsolationPlan
from jobworker.backends.local.outputlog import OutputLog
from jobworker.backends.local.record import JobRecord
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
    #: The account it runs as (None: the server's own), its uid, and how it is isolated.
    user: str | None
    uid: int
    isolation: str
    #: The kernel bounds on it, for status (empty for a job adopted by a restarted server).
    enforced: tuple[str, ...] = ()
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
    #: Called once the server closes stdin (live restore: the ingest process holds a copy).
    on_stdin_closed: Callable[[], None] | None = None
    #: The server is the main process's parent (False: adopted, see :mod:`.restore`).
    child: bool = True
    #: Why a restarted server could not adopt its process (its end is ``lost`` unless the
    #: exit report says how it ended).
    lost: str | None = None
    #: Left running by a server that stops with ``--live-restore``: nothing of it is
    #: released, a later server adopts it.
    detached: bool = False
    #: Its record (live restore), rewritten when the job ends.
    record: JobRecord | None = None

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
            user=self.user,
            uid=self.uid,
            isolation=self.isolation,
            enforced=self.enforced,
        )


def isolation_summary(plan: IsolationPlan | None) -> tuple[str | None, int, str]:
    """What status shows of ``plan``: the account, its uid, and one line about it."""
    if plan is None:
        return None, os.getuid(), "none"
    return plan.account.name, plan.account.uid, plan.describe()

"""The job model: what a job became (state, exit, usage) and how clients see it.

Everything here is an attrs value object; protobuf never reaches this module (the gRPC
service translates at the edge). What a job is asked to be, and the rules it must follow,
is :mod:`jobworker.jobspec`.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Iterable
from typing import Any

import attrs

from jobworker.errors import InvalidArgument
from jobworker.jobspec import JobSpec, Limits


def new_job_id() -> str:
    """A unique, unguessable, URL-safe id (128 random bits).

    Never starting with "-", so a command line cannot mistake it for an option.
    """
    while True:
        job_id = secrets.token_urlsafe(16)
        if not job_id.startswith("-"):
            return job_id


class Stream(enum.IntEnum):
    """Which pipe an output chunk came from; the value is the on-disk tag."""

    STDOUT = 1
    STDERR = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class JobState(enum.Enum):
    """Coarse state; the wire protocol's ``status`` string is the value."""

    RUNNING = "running"
    EXITED = "exited"


class TerminationReason(enum.Enum):
    """Why a finished job ended."""

    EXITED = "exited"  # the process returned an exit code
    SIGNALED = "signaled"  # killed by a signal nobody here sent
    STOPPED = "stopped"  # stopped on request
    OOM_KILLED = "oom_killed"  # the kernel's OOM killer, reported by a containment plugin
    NODE_LOST = "node_lost"  # the cluster node running it was lost (cluster backends)
    #: A restarted server (``serve --live-restore``) could not adopt it, nor learn how it
    #: ended; the server's log says why (``job_lost``).
    LOST = "lost"


class Action(enum.Enum):
    """What an identity asks to do; passed to ``jobworker_authorize``."""

    START = "start"
    STOP = "stop"
    STATUS = "status"
    STREAM = "stream"
    LIST = "list"
    WRITE = "write"  # to the job's stdin


@attrs.frozen
class OutputChunk:
    """A piece of one job's output, as followers receive it."""

    stream: Stream
    data: bytes
    offset: int  # position just after this chunk: pass it back to resume


def _check_page_token(instance: Any, attribute: attrs.Attribute[Any], token: str) -> None:
    if token and _page_position(token) is None:
        raise InvalidArgument(
            f"page_token {token[:80]!r} is not one this server gave: pass next_page_token"
            " of the previous page unchanged, or none for the first page"
        )


def _page_position(token: str) -> tuple[float, str] | None:
    started, _, job_id = token.partition("/")
    try:
        return float(started), job_id
    except ValueError:
        return None


#: Most jobs one ListJobs page holds; a larger page_size is served as this.
MAX_PAGE_SIZE = 1000


@attrs.frozen
class ListQuery:
    """Which jobs a listing wants, and which page: oldest first, ``page_size`` at a time."""

    state: JobState | None = None
    owner: str | None = None
    node: str | None = None  # a cluster node's name (cluster backends)
    page_size: int = 0  # 0: every match, one page
    page_token: str = attrs.field(default="", validator=_check_page_token)

    def matches(self, status: JobStatus) -> bool:
        if self.owner is not None and status.owner != self.owner:
            return False
        if self.node is not None and status.node != self.node:
            return False
        return self.state is None or status.state is self.state

    def page(self, statuses: Iterable[JobStatus]) -> tuple[list[JobStatus], str]:
        """The page of ``statuses`` this query asks for, and the next page's token ("")."""
        after = _page_position(self.page_token) if self.page_token else None
        ordered = sorted(
            (s for s in statuses if self.matches(s)), key=lambda s: (s.started_at, s.job_id)
        )
        if after is not None:
            ordered = [s for s in ordered if (s.started_at, s.job_id) > after]
        size = min(self.page_size, MAX_PAGE_SIZE) if self.page_size else len(ordered)
        page = ordered[:size]
        if len(ordered) <= size or not page:
            return page, ""
        last = page[-1]
        return page, f"{last.started_at!r}/{last.job_id}"


@attrs.frozen
class InputChunk:
    """Bytes for a job's stdin; ``eof`` closes it after them."""

    data: bytes = b""
    eof: bool = False


@attrs.frozen
class InputResult:
    """The end of one writer: bytes it put in the pipe, and whether stdin is now closed."""

    written: int
    closed: bool


@attrs.frozen
class ResourceUsage:
    """Accounting reported by a containment plugin; ``None`` where unknown."""

    cpu_usage_usec: int | None = None
    cpu_throttled_usec: int | None = None
    cpu_nr_throttled: int | None = None
    memory_peak_bytes: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    pids_peak: int | None = None


@attrs.frozen
class ExitInfo:
    """How a job ended. Exactly one of ``exit_code`` and ``signal`` is set."""

    reason: TerminationReason
    exit_code: int | None = None
    signal: int | None = None
    stopped_by: str | None = None
    escalated: bool = False  # stop needed SIGKILL after the grace period


@attrs.frozen
class JobStatus:
    """A consistent snapshot of one job, safe to hand to plugins and clients."""

    job_id: str
    spec: JobSpec
    owner: str
    state: JobState
    pid: int
    started_at: float  # Unix time
    containment: str  # e.g. "cgroupv2:/sys/fs/cgroup/worker_jobs/<id>" or "process-group"
    applied_limits: Limits = attrs.field(factory=Limits)
    ended_at: float | None = None
    exit: ExitInfo | None = None
    usage: ResourceUsage | None = None
    output_bytes: int = 0  # what the job wrote, stdout and stderr together
    #: Of those, the bytes kept for followers; less once the output was cut (its cap, the
    #: server's spool budget, a failed spool write).
    output_kept_bytes: int = 0
    output_truncated: bool = False
    #: The account the job runs as and its uid on the host (None: the server's own).
    user: str | None = None
    uid: int | None = None
    #: How the job is isolated, e.g. "namespaces, user job-61184(61184), network private".
    isolation: str = "none"
    #: The cluster node it runs on; None on a single server.
    node: str | None = None
    #: The kernel bounds on the job, one phrase each (``memory 512M (memory.max)``,
    #: ``pids 1024 (RLIMIT_NPROC of the job's uid)``, ``memory: none``).
    enforced: tuple[str, ...] = ()


@attrs.frozen
class StopResult:
    """The answer to a stop request: the job after it, and how it went."""

    status: JobStatus
    already_finished: bool
    escalated: bool
    message: str


def describe_end(status: JobStatus) -> str:
    """A short human phrase for how a finished job ended."""
    ex = status.exit
    if ex is None:
        return "running"
    how = f"exit code {ex.exit_code}" if ex.signal is None else f"signal {ex.signal}"
    if ex.reason is TerminationReason.STOPPED:
        kill = ", SIGKILL after the grace period" if ex.escalated else ""
        return f"stopped by {ex.stopped_by} ({how}{kill})"
    if ex.reason is TerminationReason.OOM_KILLED:
        return f"killed by the OOM killer ({how})"
    if ex.reason is TerminationReason.NODE_LOST:
        return f"lost with its node {status.node}"
    if ex.reason is TerminationReason.LOST:
        return "lost across a server restart (the server's log says why)"
    if ex.reason is TerminationReason.SIGNALED:
        return f"killed by {how}"
    return f"exited with {how}"


#: A job killed by signal N reports exit status 128+N, as shells do, so that a client that
#: only knows ``exit_code`` never mistakes a killed job for a success.
SIGNAL_EXIT_BASE = 128


def shell_exit_code(exit_code: int | None, signal: int | None) -> int | None:
    """The status a shell would report: the exit code, or 128+N after signal N."""
    if exit_code is not None:
        return exit_code
    if signal is not None:
        return SIGNAL_EXIT_BASE + signal
    return None


def _json_value(inst: object, field: attrs.Attribute[Any], value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


#: The fields a :class:`JobStatusView` takes as they are from its :class:`JobStatus`.
_SHARED_WITH_STATUS = (
    "job_id",
    "state",
    "owner",
    "started_at",
    "ended_at",
    "usage",
    "containment",
    "output_bytes",
    "output_kept_bytes",
    "output_truncated",
    "pid",
    "user",
    "uid",
    "isolation",
    "node",
    "enforced",
)
#: The :class:`ExitInfo` fields of a job that has not ended.
_STILL_RUNNING = {
    "reason": None,
    "exit_code": None,
    "signal": None,
    "stopped_by": None,
    "escalated": False,
}


@attrs.frozen
class JobStatusView:
    """One job as a client sees it: the flat form of a :class:`JobStatus` the API sends.

    ``None`` means not set (still running, unknown).
    """

    job_id: str
    state: JobState
    reason: TerminationReason | None  # None while running
    exit_code: int | None  # set when the process returned an exit code
    signal: int | None  # set when a signal ended it
    owner: str
    stopped_by: str | None
    escalated: bool  # a stop needed SIGKILL after the grace period
    started_at: float  # Unix time
    ended_at: float | None
    command: str
    args: tuple[str, ...]
    limits: Limits  # the limits actually applied
    usage: ResourceUsage | None
    containment: str
    output_bytes: int
    output_kept_bytes: int
    output_truncated: bool  # output was cut: a stream of it ends with DATA_LOSS
    pid: int
    user: str | None  # the account the job runs as (None: the server's own, not isolated)
    uid: int | None
    isolation: str
    node: str | None = None  # the cluster node it runs on (None: a single server)
    enforced: tuple[str, ...] = ()  # the kernel bounds on the job, one phrase each

    @classmethod
    def from_status(cls, status: JobStatus) -> JobStatusView:
        """What a client is told of ``status`` (the API carries exactly these fields)."""
        same = {name: getattr(status, name) for name in _SHARED_WITH_STATUS}
        ended = _STILL_RUNNING if status.exit is None else attrs.asdict(status.exit, recurse=False)
        spec = status.spec
        return cls(
            **same, **ended, command=spec.command, args=spec.args, limits=status.applied_limits
        )

    @property
    def shell_exit_code(self) -> int | None:
        """The status a shell would report: the exit code, or 128+N after signal N."""
        return shell_exit_code(self.exit_code, self.signal)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data in field order (the ``--json`` format of docs/cli.md)."""
        return attrs.asdict(self, value_serializer=_json_value)


@attrs.frozen
class StopView:
    """The answer to a stop request; ``status`` is the job after it (if the server sent it)."""

    success: bool
    message: str
    already_finished: bool
    escalated: bool
    status: JobStatusView | None

"""The job model: immutable values describing what a job is asked to be and what it became.

Everything here is an attrs value object; protobuf never reaches this module (the gRPC
service translates at the edge).
"""

from __future__ import annotations

import enum
import math
import secrets
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from jobworker.errors import InvalidArgument

#: PATH given to a job whose environment does not set one, so ``echo`` resolves as in a shell.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def new_job_id() -> str:
    """A unique, unguessable, URL-safe id (128 random bits).

    Never starting with "-", so a command line cannot mistake it for an option.
    """
    while True:
        job_id = secrets.token_urlsafe(16)
        if not job_id.startswith("-"):
            return job_id


def _io_tuple(items: Iterable[IoLimit]) -> tuple[IoLimit, ...]:
    return tuple(items)


def _str_tuple(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)


def _freeze_env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return types.MappingProxyType(dict(env or {}))


# -- the rules of a job spec, checked when one is built -----------------------------------

MAX_COMMAND_BYTES = 4096
MAX_ARGS = 1024
MAX_ENV = 1024
MAX_SPEC_BYTES = 256 * 1024
#: The kernel's MAX_ARG_STRLEN (32 pages of 4 KiB): execve refuses a single argument or
#: environment string of this many bytes or more, its terminating NUL included (E2BIG).
MAX_ARG_STRLEN = 32 * 4096
MAX_USER_BYTES = 256
#: cgroup files take signed 64-bit values; anything larger is a mistake.
MAX_LIMIT_VALUE = 2**63 - 1
CPU_WEIGHT_RANGE = (1, 10_000)
MAX_IO_DEVICES = 64
MAX_DEVICE_CHARS = 4096


def _positive(what: str) -> Callable[[Any, attrs.Attribute[Any], int | None], None]:
    """A validator: None, or a whole number from 1 to :data:`MAX_LIMIT_VALUE`."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
        if value is None:
            return
        where = f" for {instance.device!r}" if isinstance(instance, IoLimit) else ""
        if value < 1:
            raise InvalidArgument(f"{what}{where} {value}: give at least 1")
        if value > MAX_LIMIT_VALUE:
            raise InvalidArgument(f"{what}{where} {value} is too large: at most {MAX_LIMIT_VALUE}")

    return check


def _check_cpu(instance: Any, attribute: attrs.Attribute[Any], cpu: float | None) -> None:
    if cpu is not None and not (math.isfinite(cpu) and cpu > 0):
        raise InvalidArgument(
            f"cpu {cpu} is not a finite number of cores above 0: give a positive number of "
            "cores, e.g. 0.5"
        )


def _check_cpu_weight(instance: Any, attribute: attrs.Attribute[Any], weight: int | None) -> None:
    low, high = CPU_WEIGHT_RANGE
    if weight is not None and not low <= weight <= high:
        raise InvalidArgument(
            f"cpu weight {weight}: give a value between {low} and {high} (100 is the default share)"
        )


def _check_device(instance: Any, attribute: attrs.Attribute[Any], device: str) -> None:
    if not device:
        raise InvalidArgument("IO limit: device is empty: give a block device path or MAJ:MIN")
    if "\0" in device or len(device) > MAX_DEVICE_CHARS:
        raise InvalidArgument(f"IO device {device[:64]!r} is not a device path or MAJ:MIN")


def _check_io(instance: Any, attribute: attrs.Attribute[Any], io: tuple[IoLimit, ...]) -> None:
    if len(io) > MAX_IO_DEVICES:
        raise InvalidArgument(f"IO limits name {len(io)} devices: at most {MAX_IO_DEVICES}")
    devices = [limit.device for limit in io]
    repeated = sorted({d for d in devices if devices.count(d) > 1})
    if repeated:
        raise InvalidArgument(f"IO limits name device {repeated[0]!r} more than once")


def _check_spec(spec: JobSpec) -> None:
    """Reject a spec the launcher could not run, with a message saying what to change."""
    if not spec.command:
        raise InvalidArgument("command is empty: give the program to run")
    if len(spec.command.encode()) > MAX_COMMAND_BYTES:
        raise InvalidArgument(f"command is longer than {MAX_COMMAND_BYTES} bytes")
    if len(spec.args) > MAX_ARGS:
        raise InvalidArgument(f"{len(spec.args)} arguments: at most {MAX_ARGS} are accepted")
    if len(spec.env) > MAX_ENV:
        raise InvalidArgument(f"{len(spec.env)} environment variables: at most {MAX_ENV}")
    total = sum(len(a.encode()) for a in spec.args) + sum(
        len(k.encode()) + len(v.encode()) for k, v in spec.env.items()
    )
    if total > MAX_SPEC_BYTES:
        raise InvalidArgument(
            f"arguments and environment take {total} bytes: at most {MAX_SPEC_BYTES}"
        )
    strings = [("command", spec.command), *(("argument", a) for a in spec.args)]
    strings += [("environment", f"{k}={v}") for k, v in spec.env.items()]
    if spec.cwd is not None:
        strings.append(("cwd", spec.cwd))
    for what, value in strings:
        if "\0" in value:
            raise InvalidArgument(f"{what} contains a NUL byte, which no process can receive")
        size = len(value.encode())
        if size >= MAX_ARG_STRLEN:
            raise InvalidArgument(
                f"{what} {value[:20]!r}... is {size} bytes: the kernel accepts at most "
                f"{MAX_ARG_STRLEN - 1} bytes in one argument or environment string; "
                "pass large data in a file"
            )
    for key in spec.env:
        if not key or "=" in key:
            raise InvalidArgument(f"environment variable name {key!r} is empty or contains '='")
    if spec.cwd is not None and not spec.cwd.startswith("/"):
        raise InvalidArgument(f"cwd {spec.cwd!r} must be an absolute path")
    if spec.user is not None and (
        not spec.user or len(spec.user) > MAX_USER_BYTES or not spec.user.isprintable()
    ):
        raise InvalidArgument(f"user {spec.user!r} is not an account name")
    networks = [n.value for n in Network]
    if spec.network is not None and spec.network not in networks:
        raise InvalidArgument(f"network {spec.network!r} is not one of {', '.join(networks)}")


class Network(enum.Enum):
    """A job's network: the host's, or a namespace with only a loopback."""

    HOST = "host"
    NONE = "none"


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
class IoLimit:
    """Block IO caps for one device, given as a path or ``MAJ:MIN`` (``MAJ:MIN`` once resolved).

    At least one rate is set; each is a whole number from 1 up.
    """

    device: str = attrs.field(validator=_check_device)
    rbps: int | None = attrs.field(default=None, validator=_positive("rbps"))
    wbps: int | None = attrs.field(default=None, validator=_positive("wbps"))
    riops: int | None = attrs.field(default=None, validator=_positive("riops"))
    wiops: int | None = attrs.field(default=None, validator=_positive("wiops"))

    def __attrs_post_init__(self) -> None:
        if (self.rbps, self.wbps, self.riops, self.wiops) == (None, None, None, None):
            raise InvalidArgument(
                f"IO limit for {self.device!r} sets no rate: set read/write bps or iops, or drop it"
            )


@attrs.frozen
class Limits:
    """Resource limits; ``None`` means not limited (a plugin may apply its default).

    Every value is checked here, once; a containment plugin checks only what depends on
    its host (CPU count, devices, controllers).
    """

    cpu: float | None = attrs.field(default=None, validator=_check_cpu)  # cores, e.g. 0.5
    cpu_weight: int | None = attrs.field(default=None, validator=_check_cpu_weight)
    memory: int | None = attrs.field(default=None, validator=_positive("memory"))  # bytes
    memory_high: int | None = attrs.field(default=None, validator=_positive("memory high"))
    pids: int | None = attrs.field(default=None, validator=_positive("pids"))
    io: tuple[IoLimit, ...] = attrs.field(default=(), converter=_io_tuple, validator=_check_io)

    def __attrs_post_init__(self) -> None:
        high, limit = self.memory_high, self.memory
        if high is not None and limit is not None and high > limit:
            raise InvalidArgument(
                f"memory high {high} is above the memory limit {limit}: "
                "give a memory high at or below it"
            )

    def is_empty(self) -> bool:
        return self == Limits()


@attrs.frozen
class JobSpec:
    """What to run. ``env`` is the whole environment of the job (PATH defaulted).

    A spec the launcher could not run cannot be built: :func:`_check_spec` says why.
    """

    command: str
    args: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_freeze_env, eq=False)
    cwd: str | None = None
    limits: Limits = attrs.field(factory=Limits)
    #: The Unix account to run as; None: the default the whitelist gives the client.
    user: str | None = None
    #: "host" or "none" (only a loopback); None: the server's default.
    network: str | None = None
    #: Keep stdin open for writers (``JobManager.write_input``); False: /dev/null.
    stdin: bool = False
    #: Run on this cluster node (cluster backends only); None: wherever it fits.
    node: str | None = None

    def __attrs_post_init__(self) -> None:
        _check_spec(self)

    def job_env(self) -> dict[str, str]:
        env = dict(self.env)
        env.setdefault("PATH", DEFAULT_PATH)
        return env


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
    #: How the job is isolated, e.g. "namespaces, user nobody(65534), network host".
    isolation: str = "none"
    #: The cluster node it runs on; None on a single server.
    node: str | None = None


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

"""The job model: immutable values describing what a job is asked to be and what it became.

Everything here is an attrs value object; protobuf never reaches this module (the gRPC
service translates at the edge).
"""

from __future__ import annotations

import enum
import secrets
import types
from collections.abc import Iterable, Mapping

import attrs

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


@attrs.frozen
class IoLimit:
    """Block IO caps for one device, given as ``MAJ:MIN`` once resolved."""

    device: str
    rbps: int | None = None
    wbps: int | None = None
    riops: int | None = None
    wiops: int | None = None


@attrs.frozen
class Limits:
    """Resource limits; ``None`` means not limited (a plugin may apply its default)."""

    cpu: float | None = None  # cores, e.g. 0.5
    cpu_weight: int | None = None  # 1..10000
    memory: int | None = None  # bytes
    memory_high: int | None = None  # bytes
    pids: int | None = None
    io: tuple[IoLimit, ...] = attrs.field(default=(), converter=_io_tuple)

    def is_empty(self) -> bool:
        return self == Limits()


@attrs.frozen
class JobSpec:
    """What to run. ``env`` is the whole environment of the job (PATH defaulted)."""

    command: str
    args: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_freeze_env, eq=False)
    cwd: str | None = None
    limits: Limits = attrs.field(factory=Limits)
    node: str | None = None  # run on this cluster node (cluster backends only)

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
    node: str | None = None  # the cluster node it runs on; None on a single server

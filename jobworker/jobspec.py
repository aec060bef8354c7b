"""What a job is asked to be: the command, its environment, limits and network.

Every rule a spec must follow is checked when it is built, here and once, so no edge
(the gRPC service, the CLI, a plugin) repeats it, and a spec the launcher could not run
cannot exist. What a job became (its state, exit, usage) is :mod:`jobworker.model`.
"""

from __future__ import annotations

import enum
import math
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from jobworker.errors import InvalidArgument
from jobworker.units import CPU_WEIGHT_RANGE

#: PATH given to a job whose environment does not set one, so ``echo`` resolves as in a shell.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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
    """A job's network: a namespace of its own with a way out but none to the host (see
    :mod:`jobworker.backends.local.network`), one with only a loopback, or the host's."""

    PRIVATE = "private"
    NONE = "none"
    HOST = "host"


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

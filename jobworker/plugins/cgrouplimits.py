"""How a job's limits become the control file writes of its new cgroup v2, on this host.

The values themselves were checked when the job's :class:`~jobworker.jobspec.Limits` were
built; what is checked here depends on the host and the server's options: the CPUs there
are, the controllers enabled under the root, the server's memory maximum and defaults. All
of it is decided before the cgroup exists, so a refused job leaves nothing behind
(:meth:`jobworker.plugins.cgroupv2.CgroupV2Plugin.create` writes the plan).
"""

from __future__ import annotations

from pathlib import Path

import attrs

from jobworker.backends.local.cgroupfs import parse_device
from jobworker.errors import FailedPrecondition, InvalidArgument
from jobworker.jobspec import IoLimit, Limits
from jobworker.units import format_size

CPU_PERIOD_USEC = 100_000
MIN_CPU_QUOTA_USEC = 1_000  # cpu.max refuses a smaller quota
MIN_MEMORY = 1 << 20  # below this even the launcher is OOM-killed

_IO_KEYS = ("rbps", "wbps", "riops", "wiops")

#: The ``jobworker run`` option of each limit, for refusals.
FLAGS = {
    "cpu": "--cpu",
    "cpu_weight": "--cpu-weight",
    "memory": "--memory",
    "memory_high": "--memory-high",
    "pids": "--pids",
    "io": "the --io-* limits",
}
#: The controller each limit needs.
CONTROLLER_OF = {
    "cpu": "cpu",
    "cpu_weight": "cpu",
    "memory": "memory",
    "memory_high": "memory",
    "pids": "pids",
    "io": "io",
}


@attrs.frozen
class Plan:
    """What to write into a new job cgroup, decided before it exists."""

    writes: list[tuple[str, str]]
    applied: Limits


@attrs.frozen
class LimitPlanner:
    """What this host offers and this server allows, as the plugin found and was told."""

    root: Path
    mount: Path
    #: Controllers the mount offers, and those a job cgroup gets.
    available: frozenset[str]
    enabled: frozenset[str]
    cpus: int
    default_pids: int | None
    default_memory: int | None
    max_memory: int | None
    allow_swap: bool
    pids_by_rlimit: bool
    sys_dev_block: Path

    def pids_default_by(self) -> str | None:
        """Where the pids default is enforced, for the start-up log."""
        if self.default_pids is None:
            return None
        if "pids" in self.enabled:
            return f"{self.default_pids} (pids.max)"
        return f"{self.default_pids} (RLIMIT_NPROC)" if self.pids_by_rlimit else None

    def refused_flags(self) -> list[str]:
        """The limit options jobs cannot use on this host, for the start-up warning."""
        return [
            flag
            for field, flag in FLAGS.items()
            if CONTROLLER_OF[field] not in self.enabled
            and not (field == "pids" and self.pids_by_rlimit)
        ]

    def _require(self, fields: list[str]) -> None:
        """Refuse, naming every limit of ``fields`` this host cannot enforce at once."""
        missing = [f for f in dict.fromkeys(fields) if CONTROLLER_OF[f] not in self.enabled]
        if not missing:
            return
        reasons = []
        for field in missing:
            controller = CONTROLLER_OF[field]
            if controller in self.available:
                where = f"could not be enabled under {self.root} (see the server log)"
            else:
                where = f"is not available at {self.mount}"
            reasons.append(
                f"{field.replace('_', ' ')} (the cgroup v2 {controller!r} controller {where})"
            )
        offered = " ".join(sorted(self.available)) or "none"
        noun = "limit" if len(missing) == 1 else "limits"
        raise FailedPrecondition(
            f"this server cannot enforce the {noun} {', '.join(reasons)}; controllers"
            f" available at {self.mount}: {offered}; run on a cgroup v2 host or drop"
            f" {', '.join(FLAGS[f] for f in missing)}"
        )

    def plan(self, limits: Limits) -> Plan:
        """Check what depends on this host and decide the control file writes, before any
        mkdir. The values themselves were checked when ``limits`` was built (the model)."""
        writes: list[tuple[str, str]] = []
        needs: list[tuple[str, str]] = []  # (controller, Limits field)
        cpu = None
        if limits.cpu is not None:
            if limits.cpu > self.cpus:
                raise InvalidArgument(
                    f"cpu {limits.cpu:g} is more than the {self.cpus} CPUs of this host: "
                    f"ask for at most {self.cpus}"
                )
            quota = round(limits.cpu * CPU_PERIOD_USEC)
            if quota < MIN_CPU_QUOTA_USEC:
                raise InvalidArgument(
                    f"cpu {limits.cpu:g} is below the kernel's minimum of "
                    f"{MIN_CPU_QUOTA_USEC / CPU_PERIOD_USEC:g} cores"
                )
            cpu = quota / CPU_PERIOD_USEC
            writes.append(("cpu.max", f"{quota} {CPU_PERIOD_USEC}"))
            needs.append(("cpu", "cpu"))
        if limits.cpu_weight is not None:
            writes.append(("cpu.weight", str(limits.cpu_weight)))
            needs.append(("cpu", "cpu_weight"))
        for field in ("memory", "memory_high"):
            value = getattr(limits, field)
            if value is not None and value < MIN_MEMORY:
                raise InvalidArgument(
                    f"{field.replace('_', ' ')} {value} bytes is too small: give at least 1M"
                )
            if value is not None and self.max_memory is not None and value > self.max_memory:
                raise InvalidArgument(
                    f"{field.replace('_', ' ')} {format_size(value)} is above this server's"
                    f" maximum of {format_size(self.max_memory)} (--cgroup-max-memory):"
                    f" ask for at most {format_size(self.max_memory)}"
                )
        memory = limits.memory
        if memory is not None:
            needs.append(("memory", "memory"))
        elif "memory" in self.enabled:
            memory = self.default_memory or self.max_memory
        if memory is not None:
            writes.append(("memory.max", str(memory)))
        if limits.memory_high is not None:
            writes.append(("memory.high", str(limits.memory_high)))
            needs.append(("memory", "memory_high"))
        pids = limits.pids
        if pids is not None and ("pids" in self.enabled or not self.pids_by_rlimit):
            needs.append(("pids", "pids"))
        elif pids is not None:
            pids = None  # RLIMIT_NPROC of the job's uid holds it (the isolation plugin)
        elif "pids" in self.enabled:
            pids = self.default_pids
        if pids is not None:
            writes.append(("pids.max", str(pids)))
        io = self._plan_io(limits.io, writes)
        if io:
            needs.append(("io", "io"))
        self._require([field for _controller, field in needs])
        if "memory" in self.enabled:
            # Swap would let a job exceed memory.max; oom.group kills the whole job on OOM
            # instead of leaving it half-killed.
            if memory is not None and not self.allow_swap:
                writes.append(("memory.swap.max", "0"))
            writes.append(("memory.oom.group", "1"))
        applied = attrs.evolve(limits, cpu=cpu, memory=memory, pids=pids, io=io)
        return Plan(writes=writes, applied=applied)

    def _plan_io(
        self, limits: tuple[IoLimit, ...], writes: list[tuple[str, str]]
    ) -> tuple[IoLimit, ...]:
        resolved = []
        seen: dict[str, str] = {}
        for limit in limits:
            device = parse_device(limit.device, sys_dev_block=self.sys_dev_block)
            if device in seen:
                raise InvalidArgument(
                    f"IO device {limit.device!r} is the same disk as {seen[device]!r} "
                    f"({device}): give each disk once"
                )
            seen[device] = limit.device
            rates = [(key, getattr(limit, key)) for key in _IO_KEYS]
            given = [(key, value) for key, value in rates if value is not None]
            writes.append(("io.max", f"{device} " + " ".join(f"{k}={v}" for k, v in given)))
            resolved.append(attrs.evolve(limit, device=device))
        return tuple(resolved)

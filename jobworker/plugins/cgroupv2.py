"""The ``cgroupv2`` plugin: every job in its own cgroup v2, with its limits and accounting.

Layout (docs/cgroups.md explains why): ``<root>/<job_id>`` per job, created and limited
before the job's first process exists; the launcher joins it by writing ``0`` to its
``cgroup.procs``. Stopping signals every process in the cgroup and ends with
``cgroup.kill``, so processes that left the job's session are stopped too. Empty is
learnt from ``cgroup.events`` through inotify, never by polling.

:class:`CgroupV2Plugin` is the plugin: ``--plugin cgroupv2`` makes one with no arguments and
its ``jobworker_configure`` applies the ``--cgroup-*`` options; tests and embedders register
a ``CgroupV2Plugin(root=...)`` instance directly.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import structlog

from jobworker.containment import ContainmentReport
from jobworker.errors import ConfigError, FailedPrecondition, InvalidArgument
from jobworker.hooks import hookimpl
from jobworker.inotify import wait_until, wait_until_blocking
from jobworker.model import IoLimit, JobSpec, Limits, ResourceUsage

log = structlog.get_logger("jobworker.cgroupv2")

CGROUP_FS = Path("/sys/fs/cgroup")
#: Where systemd mounts the cgroup2 hierarchy when the controllers are bound to v1.
HYBRID_MOUNT = CGROUP_FS / "unified"
ROOT_NAME = "worker_jobs"
#: ``--cgroup-root delegated``: jobs go under the cgroup systemd delegated to the server.
DELEGATED = "delegated"
DELEGATED_JOBS = "jobs"
#: The leaf the server moves itself into when it sits where controllers must be enabled.
SERVER_LEAF = "jobworker-server"
CONTROLLERS = ("cpu", "io", "memory", "pids")
CPU_PERIOD_USEC = 100_000
MIN_CPU_QUOTA_USEC = 1_000  # cpu.max refuses a smaller quota
MIN_MEMORY = 1 << 20  # below this even the launcher is OOM-killed
MAX_CPU_WEIGHT = 10_000
DEFAULT_PIDS = 1024
#: How long start-up and shutdown wait for a killed leftover cgroup to empty.
LEFTOVER_TIMEOUT = 5.0
#: rmdir can briefly fail with EBUSY right after the last process exited.
RELEASE_RETRY = 0.2

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_DEVICE_NUMBERS = re.compile(r"(\d+):(\d+)")
_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")
_SYS_DEV_BLOCK = Path("/sys/dev/block")
_IO_KEYS = ("rbps", "wbps", "riops", "wiops")


# -- cgroupfs helpers ---------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    """One ``write(2)`` to an existing control file (the kernel parses each write alone).

    No O_CREAT: a missing control file means a missing controller, not a file to make.
    """
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_keyed(path: Path) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.events, cgroup.events); empty if missing."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    pairs = (line.split() for line in text.splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def _read_int(path: Path) -> int | None:
    """A single number (memory.peak, memory.max); None if missing or ``max``."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _read_io_bytes(path: Path) -> tuple[int | None, int | None]:
    """Read and written bytes summed over every device in io.stat."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    totals = {"rbytes": 0, "wbytes": 0}
    for line in text.splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key in totals:
                totals[key] += int(value)
    return totals["rbytes"], totals["wbytes"]


def _procs(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _descendants_first(path: Path) -> Iterator[Path]:
    """``path`` and every cgroup below it, deepest first (the order rmdir needs)."""
    for parent, dirs, _files in os.walk(path, topdown=False):
        for name in dirs:
            yield Path(parent, name)
    yield path


def _is_populated(path: Path) -> bool:
    return _read_keyed(path / "cgroup.events").get("populated", 0) != 0


def _unescape(text: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space)."""
    return _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m[1], 8)), text)


def cgroup2_mounts(mountinfo: str) -> dict[Path, str]:
    """Every cgroup2 mount point, with the hierarchy path it shows (usually ``/``)."""
    mounts: dict[Path, str] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] == "cgroup2":
            mounts[Path(_unescape(fields[4]))] = _unescape(fields[3])
    return mounts


def default_root(mounts: dict[Path, str]) -> Path:
    """``worker_jobs`` under the pure v2 mount, else under the hybrid one, else the first."""
    for preferred in (CGROUP_FS, HYBRID_MOUNT):
        if preferred in mounts:
            return preferred / ROOT_NAME
    if not mounts:
        raise ConfigError(
            "no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo): mount cgroup2 "
            f"at {CGROUP_FS} or start the server without --plugin cgroupv2"
        )
    return next(iter(mounts)) / ROOT_NAME


def own_cgroup(mount: Path, mount_source: str, proc_cgroup: str) -> Path | None:
    """Where this process sits in ``mount``, from /proc/self/cgroup; None if not visible."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            relative = os.path.relpath(line[3:], mount_source)
            if relative == ".":
                return mount
            return None if relative.startswith("..") else mount / relative
    return None


def parse_device(spec: str, *, sys_dev_block: Path = _SYS_DEV_BLOCK) -> str:
    """``MAJ:MIN`` of a whole block device given by path (``/dev/vda``) or as ``MAJ:MIN``.

    Raises InvalidArgument for anything io.max would refuse: not a block device, unknown
    numbers, a partition.
    """
    match = _DEVICE_NUMBERS.fullmatch(spec.strip())
    if match:
        device = f"{int(match[1])}:{int(match[2])}"
    else:
        try:
            st = os.stat(spec)
        except OSError as err:
            raise InvalidArgument(
                f"IO device {spec!r}: {err.strerror}; give a block device path such as "
                "/dev/vda or its MAJ:MIN"
            ) from None
        if not stat.S_ISBLK(st.st_mode):
            raise InvalidArgument(
                f"IO device {spec!r} is not a block device; give one such as /dev/vda or MAJ:MIN"
            )
        device = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    sysfs = sys_dev_block / device
    if not sysfs.exists():
        raise InvalidArgument(
            f"IO device {spec!r}: no block device {device} on this host "
            f"(see {sys_dev_block} or lsblk)"
        )
    if (sysfs / "partition").exists():
        raise InvalidArgument(
            f"IO device {spec!r} ({device}) is a partition; io.max limits whole disks only: "
            "give the disk it belongs to (lsblk shows it)"
        )
    return device


# -- one job ------------------------------------------------------------------------------


@attrs.define
class JobCgroup:
    """One job's cgroup: the :class:`jobworker.containment.Containment` this plugin returns."""

    path: Path
    applied: Limits = attrs.field(factory=Limits)
    pid: int | None = None

    @property
    def name(self) -> str:
        return f"cgroupv2:{self.path}"

    @property
    def join_path(self) -> str:
        return str(self.path / "cgroup.procs")

    def attach(self, pid: int) -> None:
        self.pid = pid

    def pids(self) -> list[int]:
        """Every process in the job's cgroup and any cgroup below it."""
        return [pid for cgroup in _descendants_first(self.path) for pid in _procs(cgroup)]

    def signal(self, signum: int) -> None:
        # A process forked after the read escapes this signal; kill() is the backstop.
        for pid in self.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """``cgroup.kill``: the kernel kills the whole subtree, forks in flight included."""
        try:
            _write(self.path / "cgroup.kill", "1")
        except FileNotFoundError:
            pass  # already released

    def is_empty(self) -> bool:
        return not _is_populated(self.path)

    async def wait_empty(self) -> None:
        try:
            await wait_until(self.path / "cgroup.events", self.is_empty)
        except FileNotFoundError:
            pass  # the cgroup is gone, so is every process in it

    def report(self) -> ContainmentReport:
        cpu = _read_keyed(self.path / "cpu.stat")
        memory_events = _read_keyed(self.path / "memory.events")
        io_read, io_write = _read_io_bytes(self.path / "io.stat")
        usage = ResourceUsage(
            cpu_usage_usec=cpu.get("usage_usec"),
            cpu_throttled_usec=cpu.get("throttled_usec"),
            cpu_nr_throttled=cpu.get("nr_throttled"),
            memory_peak_bytes=_read_int(self.path / "memory.peak"),
            io_read_bytes=io_read,
            io_write_bytes=io_write,
            pids_peak=_read_int(self.path / "pids.peak"),
        )
        oom_kills = memory_events.get("oom_kill", 0) + memory_events.get("oom_group_kill", 0)
        return ContainmentReport(oom_killed=oom_kills > 0, usage=usage)

    def release(self) -> None:
        """Remove the cgroup (and any below it); a failure is logged, never raised."""
        deadline = time.monotonic() + RELEASE_RETRY
        while True:
            try:
                for cgroup in _descendants_first(self.path):
                    os.rmdir(cgroup)
                return
            except FileNotFoundError:
                return
            except OSError as err:
                if err.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                log.warning("cgroup_release_failed", cgroup=str(self.path), error=err.strerror)
                return


# -- the plugin ---------------------------------------------------------------------------

_FLAGS = {
    "cpu": "--cpu",
    "cpu_weight": "--cpu-weight",
    "memory": "--memory",
    "memory_high": "--memory-high",
    "pids": "--pids",
    "io": "the --io-* limits",
}


@attrs.frozen
class _Plan:
    """What to write into a new job cgroup, decided before it exists."""

    writes: list[tuple[str, str]]
    applied: Limits


def _settings(options: argparse.Namespace) -> dict[str, Any]:
    """The plugin's settings from the options its ``jobworker_add_options`` added."""
    if options.cgroup_default_pids < 0:
        raise ConfigError("--cgroup-default-pids must be 0 (no default) or more")
    delegated = options.cgroup_root == DELEGATED
    return {
        "root": None if delegated else options.cgroup_root,
        "delegated": delegated,
        "default_pids": options.cgroup_default_pids or None,
        "allow_swap": options.cgroup_swap == "allow",
    }


@attrs.define(eq=False)
class CgroupV2Plugin:
    """Creates, limits and removes job cgroups under ``root``.

    ``root=None`` picks the default under the detected cgroup2 mount; ``delegated=True``
    uses ``<the server's own cgroup>/jobs`` (systemd ``Delegate=yes``). ``mount`` and
    ``self_cgroup`` are detected from /proc unless given (tests pass a fake cgroupfs).
    """

    root: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    delegated: bool = False
    default_pids: int | None = DEFAULT_PIDS
    allow_swap: bool = False
    mount: Path | None = None
    self_cgroup: Path | None = None
    cpus: int = attrs.field(factory=lambda: os.cpu_count() or 1)
    sys_dev_block: Path = _SYS_DEV_BLOCK
    _available: frozenset[str] = frozenset()
    _enabled: frozenset[str] = frozenset()
    _created_root: bool = False
    _ready: bool = False

    @classmethod
    def from_options(cls, options: argparse.Namespace) -> CgroupV2Plugin:
        return cls(**_settings(options))

    @property
    def enabled(self) -> frozenset[str]:
        """Controllers a job cgroup gets."""
        return self._enabled

    # -- set-up and shutdown -------------------------------------------------------------

    def setup(self) -> None:
        """Find the hierarchy, create the root, enable controllers, remove leftovers."""
        if self._ready:
            return
        mounts = self._mounts()
        if self.self_cgroup is None:
            self.self_cgroup = self._detect_self(mounts)
        if self.delegated:
            if self.self_cgroup is None:
                raise ConfigError(
                    "--cgroup-root delegated: this process's cgroup is not visible in a "
                    "cgroup2 mount; run it from a systemd unit with Delegate=yes"
                )
            self.root = self.self_cgroup / DELEGATED_JOBS
        if self.root is None:
            self.root = default_root(mounts)
        mount = self.mount = self._mount_of(self.root, mounts)
        self._available = frozenset((mount / "cgroup.controllers").read_text().split())
        chain = [mount]
        for part in self.root.relative_to(mount).parts:
            chain.append(chain[-1] / part)
        self._create(chain[1:])
        if not (self.root / "cgroup.kill").exists():
            raise ConfigError(
                f"{self.root} has no cgroup.kill: the cgroupv2 plugin needs Linux 5.14 or "
                "newer to stop a job's whole process tree"
            )
        self._enabled = self._enable(chain, self._available & set(CONTROLLERS))
        leftovers = self._remove_jobs()
        self._ready = True
        unusable = sorted(set(CONTROLLERS) - self._enabled)
        log.info(
            "cgroup_ready",
            root=str(self.root),
            mount=str(mount),
            controllers=sorted(self._enabled),
            unusable=unusable,
            default_pids=self.default_pids if "pids" in self._enabled else None,
            leftovers_removed=leftovers,
        )

    def shutdown(self) -> None:
        """Remove the remaining job cgroups, and the root if this plugin created it."""
        if not self._ready or self.root is None:
            return
        self._remove_jobs()
        if self._created_root:
            try:
                os.rmdir(self.root)
            except OSError as err:  # e.g. the server's own leaf is inside it
                log.info("cgroup_root_kept", root=str(self.root), reason=err.strerror)
        self._ready = False

    def _mounts(self) -> dict[Path, str]:
        if self.mount is not None:
            return {self.mount: "/"}
        with open("/proc/self/mountinfo") as f:
            return cgroup2_mounts(f.read())

    def _detect_self(self, mounts: dict[Path, str]) -> Path | None:
        with open("/proc/self/cgroup") as f:
            proc_cgroup = f.read()
        for mount, source in mounts.items():
            found = own_cgroup(mount, source, proc_cgroup)
            if found is not None:
                return found
        return None

    @staticmethod
    def _mount_of(root: Path, mounts: dict[Path, str]) -> Path:
        below = [m for m in mounts if root != m and root.is_relative_to(m)]
        if not below:
            raise ConfigError(
                f"--cgroup-root {root} is not below a cgroup2 mount "
                f"(mounted: {', '.join(map(str, mounts)) or 'none'}); choose a directory "
                "below one, e.g. /sys/fs/cgroup/worker_jobs"
            )
        return max(below, key=lambda m: len(m.parts))

    def _create(self, cgroups: list[Path]) -> None:
        for cgroup in cgroups:
            try:
                os.mkdir(cgroup)
            except FileExistsError:
                continue
            except OSError as err:
                raise ConfigError(f"cannot create cgroup {cgroup}: {err.strerror}") from None
            if cgroup == self.root:
                self._created_root = True

    def _enable(self, chain: list[Path], wanted: frozenset[str]) -> frozenset[str]:
        """Enable ``wanted`` in every ``cgroup.subtree_control`` from the mount to the root.

        A cgroup with processes cannot enable controllers for its children (the
        no-internal-process rule), so if the server sits on that path it first moves itself
        into a leaf of its own. The mount's root cgroup is exempt from the rule.
        """
        enabled = set(wanted)
        for cgroup in chain:
            control = cgroup / "cgroup.subtree_control"
            missing = enabled - set(control.read_text().split())
            if not missing:
                continue
            if cgroup != chain[0] and cgroup == self.self_cgroup:
                self._move_self(cgroup / SERVER_LEAF)
            for controller in sorted(missing):
                try:
                    _write(control, f"+{controller}")
                except OSError as err:
                    log.warning(
                        "cgroup_controller_unusable",
                        controller=controller,
                        cgroup=str(cgroup),
                        error=err.strerror,
                    )
                    enabled.discard(controller)
        return frozenset(enabled)

    def _move_self(self, leaf: Path) -> None:
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        log.info("cgroup_server_moved", cgroup=str(leaf))
        self.self_cgroup = leaf

    def _job_cgroups(self) -> list[JobCgroup]:
        """Children of the root, except the server's leaf and whatever holds the server."""
        assert self.root is not None
        jobs = []
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or child.name == SERVER_LEAF:
                continue
            if self.self_cgroup is not None and self.self_cgroup.is_relative_to(child):
                continue
            jobs.append(JobCgroup(child))
        return jobs

    def _remove_jobs(self) -> int:
        """Kill every job cgroup under the root, wait for each to empty, remove it."""
        jobs = self._job_cgroups()
        for job in jobs:
            job.kill()
        for job in jobs:
            if wait_until_blocking(job.path / "cgroup.events", job.is_empty, LEFTOVER_TIMEOUT):
                job.release()
            else:
                log.warning("cgroup_not_empty", cgroup=str(job.path), pids=job.pids())
        return len(jobs)

    # -- per job -------------------------------------------------------------------------

    def create(self, job_id: str, spec: JobSpec) -> JobCgroup:
        """The job's cgroup with its limits written; nothing is left behind on error."""
        self.setup()
        assert self.root is not None
        if not _JOB_ID.fullmatch(job_id) or job_id == SERVER_LEAF:
            raise InvalidArgument(f"job id {job_id!r} cannot name a cgroup")
        plan = self._plan(spec.limits)
        path = self.root / job_id
        try:
            os.mkdir(path)
        except OSError as err:
            raise FailedPrecondition(f"cannot create cgroup {path}: {err.strerror}") from None
        cgroup = JobCgroup(path)
        for name, value in plan.writes:
            try:
                _write(path / name, value)
            except OSError as err:
                cgroup.release()
                raise FailedPrecondition(
                    f"the kernel refused {value!r} in {path / name}: {err.strerror}"
                ) from None
        cgroup.applied = plan.applied
        if plan.applied.memory is not None or plan.applied.memory_high is not None:
            # The kernel rounds memory limits down to whole pages: report what it holds.
            cgroup.applied = attrs.evolve(
                plan.applied,
                memory=_read_int(path / "memory.max"),
                memory_high=_read_int(path / "memory.high"),
            )
        log.debug("cgroup_created", cgroup=str(path), limits=plan.writes)
        return cgroup

    def _require(self, controller: str, field: str) -> None:
        if controller in self._enabled:
            return
        assert self.mount is not None and self.root is not None
        flag = _FLAGS[field]
        if controller in self._available:
            where = f"could not be enabled under {self.root} (see the server log)"
        else:
            offered = " ".join(sorted(self._available)) or "none"
            where = f"is not available at {self.mount} (controllers: {offered})"
        raise FailedPrecondition(
            f"{field.replace('_', ' ')} limit requested but the cgroup v2 {controller!r} "
            f"controller {where}; run on a cgroup v2 host or drop {flag}"
        )

    def _plan(self, limits: Limits) -> _Plan:
        """Validate every limit and decide the control file writes, before any mkdir."""
        writes: list[tuple[str, str]] = []
        needs: list[tuple[str, str]] = []  # (controller, Limits field)
        cpu = None
        if limits.cpu is not None:
            if not (math.isfinite(limits.cpu) and limits.cpu > 0):
                raise InvalidArgument(f"cpu {limits.cpu}: give a positive number of cores")
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
            if not 1 <= limits.cpu_weight <= MAX_CPU_WEIGHT:
                raise InvalidArgument(
                    f"cpu weight {limits.cpu_weight}: give a value from 1 to {MAX_CPU_WEIGHT} "
                    "(100 is the default share)"
                )
            writes.append(("cpu.weight", str(limits.cpu_weight)))
            needs.append(("cpu", "cpu_weight"))
        for field in ("memory", "memory_high"):
            value = getattr(limits, field)
            if value is not None and value < MIN_MEMORY:
                raise InvalidArgument(
                    f"{field.replace('_', ' ')} {value} bytes is too small: give at least 1M"
                )
        if limits.memory is not None:
            writes.append(("memory.max", str(limits.memory)))
            needs.append(("memory", "memory"))
        if limits.memory_high is not None:
            if limits.memory is not None and limits.memory_high > limits.memory:
                raise InvalidArgument(
                    f"memory high {limits.memory_high} is above the memory limit "
                    f"{limits.memory}: give a memory high at or below it"
                )
            writes.append(("memory.high", str(limits.memory_high)))
            needs.append(("memory", "memory_high"))
        pids = limits.pids
        if pids is not None:
            if pids < 1:
                raise InvalidArgument(f"pids {pids}: give at least 1")
            needs.append(("pids", "pids"))
        elif "pids" in self._enabled:
            pids = self.default_pids
        if pids is not None:
            writes.append(("pids.max", str(pids)))
        io = self._plan_io(limits.io, writes)
        if io:
            needs.append(("io", "io"))
        for controller, field in needs:
            self._require(controller, field)
        if "memory" in self._enabled:
            # Swap would let a job exceed memory.max; oom.group kills the whole job on OOM
            # instead of leaving it half-killed.
            if limits.memory is not None and not self.allow_swap:
                writes.append(("memory.swap.max", "0"))
            writes.append(("memory.oom.group", "1"))
        applied = attrs.evolve(limits, cpu=cpu, pids=pids, io=io)
        return _Plan(writes=writes, applied=applied)

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
            if not given:
                raise InvalidArgument(f"IO limit for {limit.device!r} sets no rate")
            for key, value in given:
                if value < 1:
                    raise InvalidArgument(f"IO {key} for {limit.device!r} must be at least 1")
            writes.append(("io.max", f"{device} " + " ".join(f"{k}={v}" for k, v in given)))
            resolved.append(attrs.evolve(limit, device=device))
        return tuple(resolved)

    # -- hooks -------------------------------------------------------------------------

    @hookimpl
    def jobworker_add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            "cgroupv2", "Each job in its own cgroup v2 with its limits (docs/cgroups.md)."
        )
        group.add_argument(
            "--cgroup-root",
            dest="cgroup_root",
            metavar="PATH",
            help=f"the cgroup jobs are created under; {DELEGATED!r} for <the server's cgroup>/"
            f"{DELEGATED_JOBS} under systemd Delegate=yes (default: {ROOT_NAME} under the "
            f"cgroup2 mount, {CGROUP_FS} or {HYBRID_MOUNT} on a hybrid host)",
        )
        group.add_argument(
            "--cgroup-default-pids",
            dest="cgroup_default_pids",
            type=int,
            default=DEFAULT_PIDS,
            metavar="N",
            help=f"pids.max of a job that sets no --pids, so a fork bomb stays contained; "
            f"0 for none (default {DEFAULT_PIDS})",
        )
        group.add_argument(
            "--cgroup-swap",
            dest="cgroup_swap",
            choices=("deny", "allow"),
            default="deny",
            help="whether a job with a memory limit may swap beyond it (default deny)",
        )

    @hookimpl
    def jobworker_configure(self, options: argparse.Namespace) -> None:
        if hasattr(options, "cgroup_root"):  # parsed with this plugin's options
            for name, value in _settings(options).items():
                setattr(self, name, value)
        self.setup()

    @hookimpl
    def jobworker_limits_apply(self, job_id: str, spec: JobSpec) -> JobCgroup:
        return self.create(job_id, spec)

    @hookimpl
    def jobworker_shutdown(self) -> None:
        self.shutdown()

"""cgroup v2 mechanics: control files, mounts, block devices, and one job's cgroup.

What the ``cgroupv2`` plugin (:mod:`jobworker.plugins.cgroupv2`) builds on; nothing here
decides policy. Empty is learnt from ``cgroup.events`` through inotify, never by polling.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import structlog

from jobworker.backends.local.containment import ContainmentReport
from jobworker.backends.local.inotify import wait_until
from jobworker.backends.local.sampling import SLOW_TICKS, read_small
from jobworker.errors import ConfigError, InvalidArgument
from jobworker.jobspec import Limits
from jobworker.model import ResourceUsage
from jobworker.usage import UsageSample

log = structlog.get_logger("jobworker.cgroupv2")

CGROUP_FS = Path("/sys/fs/cgroup")
#: Where systemd mounts the cgroup2 hierarchy when the controllers are bound to v1.
HYBRID_MOUNT = CGROUP_FS / "unified"
ROOT_NAME = "worker_jobs"
#: rmdir can briefly fail with EBUSY right after the last process exited.
RELEASE_RETRY = 0.2

_DEVICE_NUMBERS = re.compile(r"(\d+):(\d+)")
_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")
_IO_READ = re.compile(rb"rbytes=(\d+)")
_IO_WRITE = re.compile(rb"wbytes=(\d+)")
SYS_DEV_BLOCK = Path("/sys/dev/block")


# -- cgroupfs helpers ---------------------------------------------------------------------


def write_file(path: Path, value: str) -> None:
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


def _small_int(path: str) -> int | None:
    raw = read_small(path)
    return int(raw) if raw is not None and raw.strip().isdigit() else None


def read_int(path: Path) -> int | None:
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


#: The mark a server puts on each job cgroup it creates: the record that lets the next
#: owner of the root prove a cgroup is a leftover of its own line, not someone else's.
OWNER_XATTR = "user.jobworker.server"


class RootLock:
    """A cgroup root taken by one server: an exclusive ``flock`` on the root directory
    itself, held while the server runs. The kernel drops it however the server ends
    (SIGKILL included); the descriptor is close-on-exec, so no job inherits it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _flock_holder(self._fd)
            os.close(self._fd)
            who = "another process" if holder is None else f"pid {holder}"
            raise ConfigError(
                f"cgroup root {root} is in use by another jobworker server ({who}): give"
                " this one a --cgroup-root of its own"
            ) from None

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _flock_holder(fd: int) -> int | None:
    """The pid holding a ``flock`` on ``fd``'s file, from /proc/locks (None if unknown)."""
    info = os.fstat(fd)
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == wanted:
                    return int(fields[4]) or None
    except (OSError, ValueError):
        pass
    return None


def mark_ours(cgroup: Path) -> bool:
    """Record on ``cgroup`` that this server created it; False if the filesystem cannot."""
    try:
        os.setxattr(cgroup, OWNER_XATTR, str(os.getpid()).encode())
    except OSError as err:
        log.warning(
            "cgroup_unmarked",
            cgroup=str(cgroup),
            error=err.strerror,
            consequence="if this server dies, the next one on this root will not remove it",
        )
        return False
    return True


def is_ours(cgroup: Path) -> bool:
    """Whether a server holding this root created ``cgroup`` (see :data:`OWNER_XATTR`)."""
    try:
        os.getxattr(cgroup, OWNER_XATTR)
    except OSError:
        return False
    return True


def parse_device(spec: str, *, sys_dev_block: Path = SYS_DEV_BLOCK) -> str:
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


#: How a job cgroup's name (shown in status, kept in live-restore records) starts.
NAME_PREFIX = "cgroupv2:"


@attrs.define
class JobCgroup:
    """One job's cgroup: the :class:`jobworker.backends.local.containment.Containment` this plugin
    returns."""

    path: Path
    applied: Limits = attrs.field(factory=Limits)
    pid: int | None = None
    #: Samples taken, counted from a phase of the job's own so that jobs started together
    #: do not all read their slow files on the same tick.
    _ticks: int = attrs.field(
        init=False,
        eq=False,
        repr=False,
        default=attrs.Factory(lambda self: hash(self.path.name), takes_self=True),
    )
    #: pids, memory peak, IO bytes read and written: the last slow read.
    _slow: tuple[int | None, int | None, int | None, int | None] | None = attrs.field(
        init=False, eq=False, repr=False, default=None
    )

    @property
    def name(self) -> str:
        return f"{NAME_PREFIX}{self.path}"

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
            write_file(self.path / "cgroup.kill", "1")
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
            memory_peak_bytes=read_int(self.path / "memory.peak"),
            io_read_bytes=io_read,
            io_write_bytes=io_write,
            pids_peak=read_int(self.path / "pids.peak"),
        )
        oom_kills = memory_events.get("oom_kill", 0) + memory_events.get("oom_group_kill", 0)
        return ContainmentReport(oom_killed=oom_kills > 0, usage=usage)

    def sample_usage(self) -> UsageSample | None:
        """The job's usage now (see :mod:`jobworker.usage`); None once the cgroup is gone.

        ``cpu.stat`` and ``memory.current`` every call; ``pids.current``, ``memory.peak``
        and ``io.stat`` one call in :data:`~jobworker.usage.SLOW_TICKS`, the last values kept
        between. Raw reads, no ``Path``: the sampler calls this for every job every second.
        Called by the sampler's thread only.
        """
        base = f"{self.path}/"
        cpu = read_small(base + "cpu.stat")
        if cpu is None:
            return None
        # "usage_usec N" is cpu.stat's first line.
        cpu_usec = int(cpu.split(b"\n", 1)[0].split()[1])
        memory = _small_int(base + "memory.current")  # None without the memory controller
        if self._slow is None or self._ticks % SLOW_TICKS == 0:
            self._slow = self._read_slow(base)
        self._ticks += 1
        return UsageSample(time.time(), cpu_usec, memory, *self._slow)

    @staticmethod
    def _read_slow(base: str) -> tuple[int | None, int | None, int | None, int | None]:
        io_read = io_write = None
        io = read_small(base + "io.stat")
        if io is not None:
            io_read = sum(int(v) for v in _IO_READ.findall(io))
            io_write = sum(int(v) for v in _IO_WRITE.findall(io))
        pids = _small_int(base + "pids.current")  # None without the pids controller
        return pids, _small_int(base + "memory.peak"), io_read, io_write

    def release(self) -> None:
        """Remove the cgroup (and any below it); a failure is logged, never raised.

        Blocks for up to ``RELEASE_RETRY`` seconds while rmdir answers EBUSY, so the job
        manager calls it off the event loop (see ``Containment.release``).
        """
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

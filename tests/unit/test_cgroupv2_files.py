"""The cgroupv2 plugin's file-level logic against a fake cgroupfs in a temporary directory.

The fake kernel is only what the plugin relies on: ``mkdir`` of a cgroup makes its control
files (the kernel's own names and initial contents, for the controllers enabled above it),
``rmdir`` removes them and refuses while processes are listed. Files are then read back
with exactly what the plugin wrote, so every test checks kernel syntax, not a mock's log.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import structlog.testing

from jobworker.backends.local import inotify
from jobworker.backends.local.cgroupfs import mark_ours, parse_device
from jobworker.backends.local.sampling import SLOW_TICKS
from jobworker.errors import ConfigError, FailedPrecondition, InvalidArgument
from jobworker.hooks.host import Plugins
from jobworker.jobspec import IoLimit, JobSpec, Limits
from jobworker.model import ResourceUsage
from jobworker.plugins import cgroupv2
from jobworker.plugins.cgroupv2 import (
    SERVER_LEAF,
    CgroupV2Plugin,
    JobCgroup,
    cgroup2_mounts,
    default_root,
    own_cgroup,
)

ALL = ("cpu", "io", "memory", "pids")
#: Stands in for a control file that refuses every write (the kernel's EBUSY, EINVAL...).
REFUSES_WRITES = "/proc/version"
#: Initial contents of a new cgroup's files, per controller (None: the core's own files).
KERNEL_FILES: dict[str | None, dict[str, str]] = {
    None: {
        "cgroup.procs": "",
        "cgroup.events": "populated 0\nfrozen 0\n",
        "cgroup.kill": "",
        "cgroup.subtree_control": "\n",
        "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    },
    "cpu": {"cpu.max": "max 100000\n", "cpu.weight": "100\n"},
    "io": {"io.max": "", "io.stat": ""},
    "memory": {
        "memory.max": "max\n",
        "memory.high": "max\n",
        "memory.swap.max": "max\n",
        "memory.oom.group": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    },
    "pids": {"pids.max": "max\n", "pids.events": "max 0\n"},
}


class FakeCgroupFs:
    """A cgroup2 mount in a plain directory, made real enough by patching mkdir and rmdir."""

    def __init__(self, mount: Path, offered: tuple[str, ...]) -> None:
        self.mount = mount
        self.broken: set[str] = set()  # control files that refuse writes in new cgroups
        os.mkdir(mount)
        (mount / "cgroup.controllers").write_text(" ".join(offered) + "\n")
        (mount / "cgroup.subtree_control").write_text(" ".join(offered) + "\n")
        (mount / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def owns(self, path: os.PathLike[str] | str) -> bool:
        return Path(path).is_relative_to(self.mount)

    def populate(self, path: Path) -> None:
        parent_offers = (path.parent / "cgroup.controllers").read_text().split()
        (path / "cgroup.controllers").write_text(" ".join(parent_offers) + "\n")
        for controller in (None, *parent_offers):
            for name, text in KERNEL_FILES.get(controller, {}).items():
                if name in self.broken:
                    (path / name).symlink_to(REFUSES_WRITES)
                else:
                    (path / name).write_text(text)

    def depopulate(self, path: Path) -> None:
        if (path / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        for entry in path.iterdir():
            if not entry.is_dir() or entry.is_symlink():
                entry.unlink()

    def cgroup(self, relative: str, procs: str = "") -> Path:
        """Make a cgroup as something other than the plugin would (a previous run, systemd)."""
        path = self.mount / relative
        os.mkdir(path)
        (path / "cgroup.procs").write_text(procs)
        return path


@pytest.fixture
def fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroupFs:
    return _fake(tmp_path, monkeypatch, (*ALL, "hugetlb"))


def _fake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offered: tuple[str, ...]
) -> FakeCgroupFs:
    real_mkdir, real_rmdir = os.mkdir, os.rmdir
    fake = FakeCgroupFs(tmp_path / "cgroup", offered)

    def mkdir(path: str | os.PathLike[str], mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        if fake.owns(path):
            fake.populate(Path(path))

    def rmdir(path: str | os.PathLike[str]) -> None:
        if fake.owns(path) and Path(path).is_dir():
            fake.depopulate(Path(path))
        real_rmdir(path)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "rmdir", rmdir)
    return fake


@pytest.fixture
def sys_block(tmp_path: Path) -> Path:
    """A fake /sys/dev/block: disk 8:0 with its partition 8:1, and disk 254:0."""
    root = tmp_path / "sys-dev-block"
    for device in ("8:0", "8:1", "254:0"):
        (root / device).mkdir(parents=True)
    (root / "8:1" / "partition").write_text("1\n")
    return root


def _plugin(fs: FakeCgroupFs, sys_block: Path | None = None, **kwargs: object) -> CgroupV2Plugin:
    plugin = CgroupV2Plugin(
        root=fs.mount / "worker_jobs",
        mount=fs.mount,
        self_cgroup=fs.mount,
        cpus=4,
        sys_dev_block=sys_block or Path("/nonexistent"),
        **kwargs,  # type: ignore[arg-type]
    )
    plugin.setup()
    return plugin


def _job_dirs(plugin: CgroupV2Plugin) -> list[str]:
    assert plugin.root is not None
    return sorted(p.name for p in plugin.root.iterdir() if p.is_dir())


def _read(cgroup: JobCgroup, name: str) -> str:
    return (cgroup.path / name).read_text()


# -- limits written with the kernel's syntax ---------------------------------------------


def test_every_limit_is_written_in_kernel_syntax(fs: FakeCgroupFs, sys_block: Path) -> None:
    plugin = _plugin(fs, sys_block)
    limits = Limits(
        cpu=0.5,
        cpu_weight=200,
        memory=256 << 20,
        memory_high=192 << 20,
        pids=64,
        io=[IoLimit(device="8:0", rbps=1 << 20, wiops=100)],
    )
    cgroup = plugin.create("job-1", JobSpec("true", limits=limits))
    assert cgroup.path == fs.mount / "worker_jobs" / "job-1"
    assert cgroup.join_path == str(cgroup.path / "cgroup.procs")
    assert _read(cgroup, "cpu.max") == "50000 100000"
    assert _read(cgroup, "cpu.weight") == "200"
    assert _read(cgroup, "memory.max") == str(256 << 20)
    assert _read(cgroup, "memory.high") == str(192 << 20)
    assert _read(cgroup, "memory.swap.max") == "0"
    assert _read(cgroup, "memory.oom.group") == "1"
    assert _read(cgroup, "pids.max") == "64"
    assert _read(cgroup, "io.max") == "8:0 rbps=1048576 wiops=100"
    assert cgroup.applied == limits


def test_applied_reports_what_the_kernel_holds(fs: FakeCgroupFs) -> None:
    plugin = _plugin(fs)
    cgroup = plugin.create("job-1", JobSpec("true", limits=Limits(cpu=0.123456, memory=5 << 20)))
    assert _read(cgroup, "cpu.max") == "12346 100000"
    assert cgroup.applied.cpu == 0.12346
    (cgroup.path / "memory.max").write_text("5242880\n")  # as the kernel shows it
    assert plugin.create("job-2", JobSpec("true", limits=Limits(memory=5 << 20))).applied == (
        Limits(memory=5 << 20, pids=cgroupv2.DEFAULT_PIDS)
    )


def test_device_path_is_resolved_to_its_numbers(
    fs: FakeCgroupFs, sys_block: Path, tmp_path: Path
) -> None:
    node = tmp_path / "vdb"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(254, 0))
    except PermissionError:
        pytest.skip("mknod of a block device node needs CAP_MKNOD")
    plugin = _plugin(fs, sys_block)
    limits = Limits(io=[IoLimit(device=str(node), wbps=2 << 20)])
    cgroup = plugin.create("job-1", JobSpec("true", limits=limits))
    assert _read(cgroup, "io.max") == "254:0 wbps=2097152"
    assert cgroup.applied.io == (IoLimit(device="254:0", wbps=2 << 20),)


def test_no_limits_still_gets_a_cgroup_with_the_pids_default(fs: FakeCgroupFs) -> None:
    cgroup = _plugin(fs).create("job-1", JobSpec("true"))
    assert _read(cgroup, "pids.max") == str(cgroupv2.DEFAULT_PIDS)
    assert _read(cgroup, "memory.oom.group") == "1"
    assert _read(cgroup, "memory.swap.max") == "max\n"  # no memory limit: swap not touched
    assert _read(cgroup, "cpu.max") == "max 100000\n"
    assert cgroup.applied == Limits(pids=cgroupv2.DEFAULT_PIDS)


def test_pids_default_can_be_off_and_swap_allowed(fs: FakeCgroupFs) -> None:
    plugin = _plugin(fs, default_pids=None, allow_swap=True)
    cgroup = plugin.create("job-1", JobSpec("true", limits=Limits(memory=64 << 20)))
    assert _read(cgroup, "pids.max") == "max\n"
    assert _read(cgroup, "memory.swap.max") == "max\n"
    assert cgroup.applied == Limits(memory=64 << 20)


# -- validation, before anything is created ----------------------------------------------


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (Limits(cpu=4.5), "more than the 4 CPUs of this host: ask for at most 4"),
        (Limits(cpu=0.001), "below the kernel's minimum of 0.01 cores"),
        (Limits(memory=4096), "memory 4096 bytes is too small: give at least 1M"),
        (Limits(io=[IoLimit(device="9:9", rbps=1)]), "no block device 9:9 on this host"),
        (Limits(io=[IoLimit(device="8:1", rbps=1)]), "is a partition"),
        (
            Limits(io=[IoLimit(device="8:0", rbps=1), IoLimit(device="008:000", wbps=1)]),
            "same disk as '8:0' (8:0): give each disk once",
        ),
    ],
)
def test_invalid_limits_are_refused_before_mkdir(
    fs: FakeCgroupFs, sys_block: Path, limits: Limits, message: str
) -> None:
    plugin = _plugin(fs, sys_block)
    with pytest.raises(InvalidArgument) as info:
        plugin.create("job-1", JobSpec("true", limits=limits))
    assert message in str(info.value)
    assert _job_dirs(plugin) == []


@pytest.mark.parametrize("job_id", ["", "a/b", "..", SERVER_LEAF, "x" * 129])
def test_job_id_must_be_a_plain_name(fs: FakeCgroupFs, job_id: str) -> None:
    with pytest.raises(InvalidArgument, match="cannot name a cgroup"):
        _plugin(fs).create(job_id, JobSpec("true"))


def test_missing_controller_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = _fake(tmp_path, monkeypatch, ("cpu", "pids"))
    plugin = _plugin(fs)
    assert plugin.enabled == {"cpu", "pids"}
    with pytest.raises(FailedPrecondition) as info:
        plugin.create("job-1", JobSpec("true", limits=Limits(cpu=1, memory_high=64 << 20)))
    assert str(info.value) == (
        "this server cannot enforce the limit memory high (the cgroup v2 'memory' controller"
        f" is not available at {fs.mount}); controllers available at {fs.mount}: cpu pids;"
        " run on a cgroup v2 host or drop --memory-high"
    )
    assert _job_dirs(plugin) == []
    # Without a memory controller there is nothing to write for memory at all.
    cgroup = plugin.create("job-2", JobSpec("true", limits=Limits(cpu=1)))
    assert not (cgroup.path / "memory.oom.group").exists()


def test_every_unenforceable_limit_is_named_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = _fake(tmp_path, monkeypatch, ("hugetlb",))
    plugin = _plugin(fs, pids_by_rlimit=False)  # as with --no-isolation
    limits = Limits(cpu=1, memory=64 << 20, pids=10)
    with pytest.raises(FailedPrecondition) as info:
        plugin.create("job-1", JobSpec("true", limits=limits))
    assert str(info.value) == (
        f"this server cannot enforce the limits cpu (the cgroup v2 'cpu' controller is not"
        f" available at {fs.mount}), memory (the cgroup v2 'memory' controller is not"
        f" available at {fs.mount}), pids (the cgroup v2 'pids' controller is not available"
        f" at {fs.mount}); controllers available at {fs.mount}: hugetlb; run on a cgroup v2"
        " host or drop --cpu, --memory, --pids"
    )


def test_start_up_warns_of_the_limits_it_will_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = _fake(tmp_path, monkeypatch, ("hugetlb", "pids"))
    with structlog.testing.capture_logs() as logs:
        _plugin(fs)
    ready = next(e for e in logs if e["event"] == "cgroup_ready")
    assert (ready["available"], ready["enabled"]) == (["hugetlb", "pids"], ["pids"])
    warning = next(e for e in logs if e["event"] == "cgroup_limits_unenforceable")
    assert warning["log_level"] == "warning"
    assert warning["refused"] == [
        "--cpu", "--cpu-weight", "--memory", "--memory-high", "the --io-* limits"
    ]  # fmt: skip
    assert warning["available"] == ready["available"]


def test_pids_without_a_controller_are_left_to_the_uid_rlimit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = _fake(tmp_path, monkeypatch, ("hugetlb",))
    with structlog.testing.capture_logs() as logs:
        plugin = _plugin(fs)
    ready = next(e for e in logs if e["event"] == "cgroup_ready")
    assert ready["default_pids"] == f"{cgroupv2.DEFAULT_PIDS} (RLIMIT_NPROC)"
    warning = next(e for e in logs if e["event"] == "cgroup_limits_unenforceable")
    assert "--pids" not in warning["refused"]
    cgroup = plugin.create("job-1", JobSpec("true", limits=Limits(pids=10)))
    assert cgroup.applied == Limits()  # the isolation plugin's RLIMIT_NPROC holds it


def test_default_and_maximum_memory(fs: FakeCgroupFs) -> None:
    plugin = _plugin(fs, default_memory=64 << 20, max_memory=128 << 20)
    cgroup = plugin.create("job-1", JobSpec("true"))
    assert _read(cgroup, "memory.max") == str(64 << 20)
    assert _read(cgroup, "memory.swap.max") == "0"  # a memory limit, defaulted or not
    assert cgroup.applied.memory == 64 << 20
    asked = plugin.create("job-2", JobSpec("true", limits=Limits(memory=128 << 20)))
    assert asked.applied.memory == 128 << 20
    for limits, field in (
        (Limits(memory=256 << 20), "memory"),
        (Limits(memory_high=1 << 30), "memory high"),
    ):
        with pytest.raises(InvalidArgument) as info:
            plugin.create("job-3", JobSpec("true", limits=limits))
        size = "256M" if field == "memory" else "1G"
        assert str(info.value) == (
            f"{field} {size} is above this server's maximum of 128M (--cgroup-max-memory):"
            " ask for at most 128M"
        )
    assert _job_dirs(plugin) == ["job-1", "job-2"]  # nothing of job-3
    plugin.shutdown()  # one plugin (server) per root at a time
    only_maximum = _plugin(fs, max_memory=128 << 20).create("job-4", JobSpec("true"))
    assert only_maximum.applied.memory == 128 << 20  # the maximum bounds every job


def test_controller_that_cannot_be_enabled(fs: FakeCgroupFs) -> None:
    fs.broken.add("cgroup.subtree_control")  # of the root the plugin creates
    plugin = _plugin(fs, pids_by_rlimit=False)
    assert plugin.enabled == frozenset()
    assert plugin.create("job-1", JobSpec("true")).applied == Limits()  # no pids default
    with pytest.raises(FailedPrecondition, match=r"'pids' controller could not be enabled under"):
        plugin.create("job-2", JobSpec("true", limits=Limits(pids=5)))


def test_refused_write_leaves_no_cgroup(fs: FakeCgroupFs) -> None:
    plugin = _plugin(fs)
    fs.broken.add("memory.max")
    with pytest.raises(FailedPrecondition) as info:
        plugin.create("job-1", JobSpec("true", limits=Limits(memory=64 << 20)))
    assert f"the kernel refused '67108864' in {plugin.root}/job-1/memory.max" in str(info.value)
    assert _job_dirs(plugin) == []


# -- set-up: hierarchy, delegation, leftovers --------------------------------------------


def test_setup_creates_the_root_and_shutdown_removes_it(fs: FakeCgroupFs) -> None:
    plugin = _plugin(fs)
    assert plugin.enabled == set(ALL)
    plugin.create("job-1", JobSpec("true"))
    plugin.shutdown()
    assert not (fs.mount / "worker_jobs").exists()


def test_root_not_created_by_us_is_kept(fs: FakeCgroupFs) -> None:
    fs.cgroup("worker_jobs")
    plugin = _plugin(fs)
    plugin.create("job-1", JobSpec("true"))
    plugin.shutdown()
    assert (fs.mount / "worker_jobs").is_dir()
    assert _job_dirs(plugin) == []


def test_delegated_server_moves_itself_into_a_leaf(fs: FakeCgroupFs) -> None:
    fs.cgroup("system.slice")
    service = fs.cgroup("system.slice/jobworker.api.service", procs=f"{os.getpid()}\n")
    plugin = CgroupV2Plugin(delegated=True, mount=fs.mount, self_cgroup=service)
    plugin.setup()
    assert plugin.root == service / "jobs"
    assert plugin.self_cgroup == service / SERVER_LEAF
    assert (service / SERVER_LEAF / "cgroup.procs").read_text() == str(os.getpid())
    assert plugin.enabled == set(ALL)
    plugin.shutdown()  # the server's leaf is never treated as a job
    assert (service / SERVER_LEAF).is_dir()
    assert not (service / "jobs").exists()


def test_leftovers_are_killed_waited_for_and_removed(fs: FakeCgroupFs) -> None:
    root = fs.cgroup("worker_jobs")
    quiet = fs.cgroup("worker_jobs/old-quiet")
    busy = fs.cgroup("worker_jobs/old-busy", procs="4242\n")
    for leftover in (quiet, busy):  # created by the previous server on this root
        assert mark_ours(leftover)
    # Not marked: created by someone else (an older server, a person): never killed.
    foreign = fs.cgroup("worker_jobs/foreign", procs="4343\n")
    fs.cgroup(f"worker_jobs/{SERVER_LEAF}")
    (busy / "cgroup.events").write_text("populated 1\nfrozen 0\n")

    def kernel_kills_busy() -> None:
        # What cgroup.kill does, a moment later: the processes are gone.
        deadline = time.monotonic() + 5
        while (busy / "cgroup.kill").read_text() != "1" and time.monotonic() < deadline:
            time.sleep(0.005)
        (busy / "cgroup.procs").write_text("")
        (busy / "cgroup.events").write_text("populated 0\nfrozen 0\n")

    kernel = threading.Thread(target=kernel_kills_busy)
    kernel.start()
    plugin = _plugin(fs)  # takes the root: removes nothing yet
    assert quiet.exists()
    plugin.claim()  # once the server listens
    kernel.join()
    assert not quiet.exists()
    assert not busy.exists()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["foreign", SERVER_LEAF]
    assert (foreign / "cgroup.kill").read_text() != "1"


def test_a_second_plugin_on_a_held_root_is_refused_naming_the_holder(fs: FakeCgroupFs) -> None:
    first = _plugin(fs)
    with pytest.raises(ConfigError) as refused:
        _plugin(fs)
    assert str(refused.value) == (
        f"cgroup root {fs.mount / 'worker_jobs'} is in use by another jobworker server (pid"
        f" {os.getpid()}): give this one a --cgroup-root of its own"
    )
    first.shutdown()
    _plugin(fs).shutdown()  # let go at shutdown: the next one takes it


def test_no_cgroup2_mount_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no cgroup v2 hierarchy is mounted"):
        default_root({})


def test_root_outside_the_mount_is_a_config_error(fs: FakeCgroupFs, tmp_path: Path) -> None:
    plugin = CgroupV2Plugin(root=tmp_path / "elsewhere", mount=fs.mount)
    with pytest.raises(ConfigError, match="is not below a cgroup2 mount"):
        plugin.setup()


HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE_MOUNTINFO = """\
24 18 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
90 24 0:22 /ci /mnt/my\\040cg rw,relatime - cgroup2 cgroup2 rw
"""


def test_mounts_and_default_root() -> None:
    hybrid = cgroup2_mounts(HYBRID_MOUNTINFO)
    assert hybrid == {Path("/sys/fs/cgroup/unified"): "/"}
    assert default_root(hybrid) == Path("/sys/fs/cgroup/unified/worker_jobs")
    pure = cgroup2_mounts(PURE_MOUNTINFO)
    assert pure == {Path("/sys/fs/cgroup"): "/", Path("/mnt/my cg"): "/ci"}
    assert default_root(pure) == Path("/sys/fs/cgroup/worker_jobs")


def test_own_cgroup() -> None:
    proc = "0::/system.slice/jobworker.api.service\n"
    mount = Path("/sys/fs/cgroup")
    assert own_cgroup(mount, "/", proc) == mount / "system.slice/jobworker.api.service"
    assert own_cgroup(mount, "/", "0::/\n") == mount
    assert own_cgroup(mount, "/system.slice", proc) == mount / "jobworker.api.service"
    assert own_cgroup(mount, "/user.slice", proc) is None
    assert own_cgroup(mount, "/", "1:name=systemd:/\n") is None


# -- devices ------------------------------------------------------------------------------


def test_parse_device(sys_block: Path, tmp_path: Path) -> None:
    assert parse_device("8:0", sys_dev_block=sys_block) == "8:0"
    assert parse_device(" 254:00 ", sys_dev_block=sys_block) == "254:0"
    regular = tmp_path / "file"
    regular.write_text("")
    with pytest.raises(InvalidArgument, match="is not a block device"):
        parse_device(str(regular), sys_dev_block=sys_block)
    with pytest.raises(InvalidArgument, match="No such file or directory; give a block device"):
        parse_device("/dev/nonexistent-disk", sys_dev_block=sys_block)
    with pytest.raises(InvalidArgument, match="no block device 1:2"):
        parse_device("1:2", sys_dev_block=sys_block)


# -- report -------------------------------------------------------------------------------


def test_report_parses_the_kernel_accounting(tmp_path: Path) -> None:
    (tmp_path / "cpu.stat").write_text(
        "usage_usec 812345\nuser_usec 800000\nsystem_usec 12345\nnice_usec 0\n"
        "core_sched.force_idle_usec 0\nnr_periods 40\nnr_throttled 38\n"
        "throttled_usec 3123456\nnr_bursts 0\nburst_usec 0\n"
    )
    (tmp_path / "memory.events").write_text(
        "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n"
    )
    (tmp_path / "memory.peak").write_text("52428800\n")
    (tmp_path / "io.stat").write_text(
        "254:0 rbytes=4096 wbytes=12582912 rios=1 wios=96 dbytes=0 dios=0\n"
        "8:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n"
    )
    (tmp_path / "pids.peak").write_text("20\n")
    report = JobCgroup(tmp_path).report()
    assert report.oom_killed is True
    assert report.usage == ResourceUsage(
        cpu_usage_usec=812345,
        cpu_throttled_usec=3123456,
        cpu_nr_throttled=38,
        memory_peak_bytes=52428800,
        io_read_bytes=4196,
        io_write_bytes=12583112,
        pids_peak=20,
    )


def test_report_without_controllers(tmp_path: Path) -> None:
    (tmp_path / "cpu.stat").write_text("usage_usec 5\nuser_usec 3\nsystem_usec 2\n")
    report = JobCgroup(tmp_path).report()
    assert report.oom_killed is False
    assert report.usage == ResourceUsage(cpu_usage_usec=5)


def test_group_oom_kill_counts_as_oom(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text("oom 1\noom_kill 0\noom_group_kill 1\n")
    assert JobCgroup(tmp_path).report().oom_killed is True


# -- waiting for empty without polling ----------------------------------------------------


def test_wait_until_wakes_on_modification_only(tmp_path: Path) -> None:
    events = tmp_path / "cgroup.events"
    events.write_text("populated 1\n")
    checks = []

    def empty() -> bool:
        checks.append(events.read_text())
        return events.read_text() == "populated 0\n"

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, events.write_text, "populated 0\n")
        started = loop.time()
        await asyncio.wait_for(inotify.wait_until(events, empty), timeout=5)
        return loop.time() - started

    elapsed = asyncio.run(scenario())
    assert 0.15 < elapsed < 2
    # Checked once after arming the watch, then once per modification: never on a timer.
    # (write_text truncates then writes: up to two modification events.)
    assert checks[0] == "populated 1\n" and checks[-1] == "populated 0\n"
    assert len(checks) <= 3


def test_wait_until_returns_at_once_when_already_done(tmp_path: Path) -> None:
    events = tmp_path / "cgroup.events"
    events.write_text("populated 0\n")
    asyncio.run(asyncio.wait_for(JobCgroup(tmp_path).wait_empty(), timeout=1))


def test_wait_until_returns_when_the_file_goes(tmp_path: Path) -> None:
    events = tmp_path / "cgroup.events"
    events.write_text("populated 1\n")

    async def scenario() -> None:
        asyncio.get_running_loop().call_later(0.05, events.unlink)
        await asyncio.wait_for(inotify.wait_until(events, lambda: False), timeout=5)

    asyncio.run(scenario())


def test_wait_empty_of_a_removed_cgroup_returns(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(JobCgroup(tmp_path / "gone").wait_empty(), timeout=1))
    with pytest.raises(FileNotFoundError):
        asyncio.run(inotify.wait_until(tmp_path / "gone", lambda: True))


def test_blocking_wait_times_out(tmp_path: Path) -> None:
    events = tmp_path / "cgroup.events"
    events.write_text("populated 1\n")
    assert inotify.wait_until_blocking(events, lambda: False, timeout=0.05) is False


# -- release ------------------------------------------------------------------------------


def test_release_is_idempotent_and_never_raises(fs: FakeCgroupFs) -> None:
    plugin = _plugin(fs)
    cgroup = plugin.create("job-1", JobSpec("true"))
    (cgroup.path / "cgroup.procs").write_text("4242\n")  # a process that will not die
    cgroup.release()  # EBUSY after retrying: logged, kept
    assert cgroup.path.is_dir()
    (cgroup.path / "cgroup.procs").write_text("")
    cgroup.release()
    cgroup.release()
    assert not cgroup.path.exists()


# -- as a plugin --------------------------------------------------------------------------


def test_registered_instance_answers_limits_apply(fs: FakeCgroupFs) -> None:
    plugins = Plugins()
    plugin = CgroupV2Plugin(root=fs.mount / "jobs", mount=fs.mount, self_cgroup=fs.mount)
    plugins.register(plugin, name="cgroupv2")
    plugins.configure(argparse.Namespace())
    containment = plugins.limits_apply("job-1", JobSpec("true", limits=Limits(pids=3)))
    assert isinstance(containment, JobCgroup)
    assert containment.applied == Limits(pids=3)
    plugins.shutdown()
    assert not (fs.mount / "jobs").exists()


def test_options(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    CgroupV2Plugin().jobworker_add_options(parser)
    defaults = parser.parse_args([])
    plugin = CgroupV2Plugin.from_options(defaults)
    assert (plugin.root, plugin.delegated, plugin.default_pids, plugin.allow_swap) == (
        None,
        False,
        cgroupv2.DEFAULT_PIDS,
        False,
    )
    options = parser.parse_args(
        ["--cgroup-root", "delegated", "--cgroup-default-pids", "0", "--cgroup-swap", "allow"]
    )
    plugin = CgroupV2Plugin.from_options(options)
    assert (plugin.root, plugin.delegated, plugin.default_pids, plugin.allow_swap) == (
        None,
        True,
        None,
        True,
    )
    with pytest.raises(ConfigError, match="--cgroup-default-pids"):
        CgroupV2Plugin.from_options(parser.parse_args(["--cgroup-default-pids", "-1"]))
    memory = ["--cgroup-default-memory", "512M", "--cgroup-max-memory", "2G"]
    plugin = CgroupV2Plugin.from_options(parser.parse_args(memory))
    assert (plugin.default_memory, plugin.max_memory) == (512 << 20, 2 << 30)
    with pytest.raises(ConfigError, match="--cgroup-default-memory 4G is above --cgroup-max"):
        CgroupV2Plugin.from_options(parser.parse_args([*memory[:1], "4G", *memory[2:]]))


# -- usage samples ------------------------------------------------------------------------


def _accounting(path: Path, n: int) -> None:
    """Every file a sample reads, each holding a number made of ``n``."""
    (path / "cpu.stat").write_text(f"usage_usec {n}\nuser_usec {n}\nsystem_usec 0\n")
    (path / "memory.current").write_text(f"{n * 10}\n")
    (path / "memory.peak").write_text(f"{n * 20}\n")
    (path / "pids.current").write_text(f"{n}\n")
    (path / "io.stat").write_text(f"8:0 rbytes={n} wbytes={n * 2} rios=1 wios=1\n")


def test_a_sample_reads_cpu_and_memory_each_tick_and_the_slow_files_every_few(
    tmp_path: Path,
) -> None:
    cgroup = JobCgroup(path=tmp_path / "job")
    cgroup.path.mkdir()
    _accounting(cgroup.path, 1)
    first = cgroup.sample_usage()
    assert first is not None
    assert (first.cpu_usec, first.memory_bytes, first.pids) == (1, 10, 1)
    assert (first.memory_peak_bytes, first.io_read_bytes, first.io_write_bytes) == (20, 1, 2)
    _accounting(cgroup.path, 7)
    later = [s for s in (cgroup.sample_usage() for _ in range(SLOW_TICKS)) if s is not None]
    assert [(s.cpu_usec, s.memory_bytes) for s in later] == [(7, 70)] * SLOW_TICKS
    slow = [(s.pids, s.memory_peak_bytes, s.io_read_bytes, s.io_write_bytes) for s in later]
    # Stale for at most SLOW_TICKS - 1 ticks, then fresh from then on.
    assert slow[-1] == (7, 140, 7, 14)
    assert slow == sorted(slow) and set(slow) <= {(1, 20, 1, 2), (7, 140, 7, 14)}
    for name in os.listdir(cgroup.path):
        os.unlink(cgroup.path / name)
    cgroup.path.rmdir()
    assert cgroup.sample_usage() is None  # the cgroup is gone


def test_a_server_whose_jobs_run_elsewhere_never_takes_or_sweeps_the_root(
    fs: FakeCgroupFs,
) -> None:
    """A Ray front server with --plugin cgroupv2: the options are for the nodes."""
    fs.cgroup("worker_jobs")
    leftover = fs.cgroup("worker_jobs/a-node-job", procs="4242\n")
    assert mark_ours(leftover)
    plugin = CgroupV2Plugin(root=fs.mount / "worker_jobs", mount=fs.mount, self_cgroup=fs.mount)
    plugins = Plugins()
    plugins.register(plugin, name="cgroupv2")
    plugin.prepare()  # what jobworker_configure does
    plugins.manager_ready(object())  # type: ignore[arg-type]  # a backend of no local jobs
    assert (leftover / "cgroup.kill").read_text() != "1"
    _plugin(fs).shutdown()  # the root is free: a node agent here could take it

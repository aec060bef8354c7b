"""The cgroupv2 plugin's limits, as the kernel enforces and counts them (pure cgroup v2).

These run inside the test VM (``python tests/vm/run_vm.py -- python -m pytest -m cgroup
tests/vm``): the host mounts cgroups hybrid and can enforce none of this. Each test spawns
its processes the way the launcher does (join ``cgroup.procs`` first, then exec) and
asserts the kernel's own figures. Interpreter start-up costs seconds under TCG, so the
workloads are shell and coreutils, and there are few tests.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from jobworker.backends.local.inotify import wait_until_blocking
from jobworker.jobspec import IoLimit, JobSpec, Limits
from jobworker.model import new_job_id
from jobworker.plugins.cgroupv2 import CgroupV2Plugin, JobCgroup

CGROUP_FS = Path("/sys/fs/cgroup")
NEEDED = {"cpu", "io", "memory", "pids"}


def _skip_reason() -> str | None:
    controllers = CGROUP_FS / "cgroup.controllers"
    if not controllers.exists():
        return f"no pure cgroup v2 hierarchy at {CGROUP_FS}: run inside tests/vm/run_vm.py"
    missing = NEEDED - set(controllers.read_text().split())
    if missing:
        return f"{CGROUP_FS} lacks the {' '.join(sorted(missing))} controllers (hybrid host?)"
    if os.geteuid() != 0:
        return "creating cgroups needs root"
    return None


pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]


@pytest.fixture
def plugin() -> Iterator[CgroupV2Plugin]:
    plugin = CgroupV2Plugin(root=CGROUP_FS / f"jobworker-test-{secrets.token_hex(4)}")
    plugin.setup()
    assert plugin.enabled == NEEDED
    try:
        yield plugin
    finally:
        plugin.shutdown()
        assert plugin.root is not None and not plugin.root.exists()


def _start(
    cgroup: JobCgroup, command: Sequence[str], stdout: int | None = None
) -> subprocess.Popen[bytes]:
    """Run ``command`` inside ``cgroup`` from its first instruction, as the launcher does."""
    script = f'echo 0 > {shlex.quote(cgroup.join_path)} || exit 125; exec "$@"'
    proc = subprocess.Popen(
        ["sh", "-c", script, "sh", *command], stdout=stdout, start_new_session=True
    )
    cgroup.attach(proc.pid)
    return proc


def _finish(cgroup: JobCgroup) -> None:
    cgroup.kill()
    asyncio.run(asyncio.wait_for(cgroup.wait_empty(), timeout=30))


def _keyed(cgroup: JobCgroup, name: str) -> dict[str, int]:
    pairs = (line.split() for line in (cgroup.path / name).read_text().splitlines())
    return {key: int(value) for key, value in pairs}


def test_memory_limit_ends_in_an_oom_kill(plugin: CgroupV2Plugin) -> None:
    limit = 50 << 20
    cgroup = plugin.create(new_job_id(), JobSpec("python", limits=Limits(memory=limit)))
    assert cgroup.applied.memory == limit
    allocate = "x = b'1' * (200 << 20)"  # four times the limit, every page touched
    proc = _start(cgroup, [sys.executable, "-I", "-S", "-c", allocate])
    assert proc.wait(timeout=120) == -signal.SIGKILL
    _finish(cgroup)
    report = cgroup.report()
    assert report.oom_killed is True
    assert report.usage is not None and report.usage.memory_peak_bytes is not None
    assert report.usage.memory_peak_bytes <= limit


def test_cpu_limit_throttles_a_busy_loop(plugin: CgroupV2Plugin) -> None:
    cgroup = plugin.create(new_job_id(), JobSpec("sh", limits=Limits(cpu=0.2)))
    assert (cgroup.path / "cpu.max").read_text().split() == ["20000", "100000"]
    started = time.monotonic()
    proc = _start(cgroup, ["timeout", "3.5", "sh", "-c", "while :; do :; done"])
    assert proc.wait(timeout=60) == 124  # stopped by timeout(1), not by the limit
    wall = time.monotonic() - started
    _finish(cgroup)
    usage = cgroup.report().usage
    assert usage is not None and usage.cpu_usage_usec is not None
    share = usage.cpu_usage_usec / 1e6 / wall
    assert 0.15 <= share <= 0.25, f"{share:.3f} of a CPU over {wall:.2f}s"
    assert usage.cpu_nr_throttled and usage.cpu_nr_throttled > 0
    assert usage.cpu_throttled_usec and usage.cpu_throttled_usec > 0


def _scratch_disk() -> str | None:
    serial = os.environ.get("JOBWORKER_SCRATCH_SERIAL")
    for entry in sorted(Path("/sys/block").iterdir()):
        found = entry / "serial"
        if serial and found.exists() and found.read_text().strip() == serial:
            return f"/dev/{entry.name}"
    return None


@pytest.mark.skipif(_scratch_disk() is None, reason="no scratch disk ($JOBWORKER_SCRATCH_SERIAL)")
def test_io_write_limit_paces_direct_writes(plugin: CgroupV2Plugin) -> None:
    disk = _scratch_disk()
    assert disk is not None
    rate, mib = 2 << 20, 12
    # The same writes without a limit, first: under TCG on a busy host the guest itself can
    # be slower than the limit, and then only the upper bound says anything.
    unlimited = plugin.create(new_job_id(), JobSpec("dd"))
    started = time.monotonic()
    dd = ["dd", "if=/dev/zero", f"of={disk}", "bs=1M", f"count={mib}", "oflag=direct"]
    assert _start(unlimited, dd).wait(timeout=120) == 0
    baseline = (mib << 20) / (time.monotonic() - started)
    _finish(unlimited)
    unlimited.release()
    limits = Limits(io=[IoLimit(device=disk, wbps=rate)])
    cgroup = plugin.create(new_job_id(), JobSpec("dd", limits=limits))
    major_minor = cgroup.applied.io[0].device
    in_force = (cgroup.path / "io.max").read_text().split()
    assert in_force[:3] == [major_minor, "rbps=max", f"wbps={rate}"]
    started = time.monotonic()
    assert _start(cgroup, dd).wait(timeout=120) == 0
    measured = (mib << 20) / (time.monotonic() - started)
    _finish(cgroup)
    # blk-throttle lets a first slice through at once: a burst, hence the loose bounds.
    figures = f"{measured / (1 << 20):.2f} MiB/s, unlimited {baseline / (1 << 20):.2f} MiB/s"
    assert 0.6 * min(rate, baseline) <= measured <= 1.5 * rate, figures
    usage = cgroup.report().usage
    assert usage is not None and usage.io_write_bytes is not None
    assert usage.io_write_bytes >= mib << 20


def test_pids_limit_contains_a_fork_bomb(plugin: CgroupV2Plugin) -> None:
    cgroup = plugin.create(new_job_id(), JobSpec("sh", limits=Limits(pids=20)))
    assert (cgroup.path / "pids.max").read_text().strip() == "20"
    bomb = "bomb() { bomb | bomb & }; bomb 2>/dev/null"
    proc = _start(cgroup, ["sh", "-c", bomb])
    proc.wait(timeout=60)  # the bomb outlives the shell that lit it

    def refused_a_fork() -> bool:
        return _keyed(cgroup, "pids.events")["max"] > 0

    assert wait_until_blocking(cgroup.path / "pids.events", refused_a_fork, timeout=60)
    current = int((cgroup.path / "pids.current").read_text())
    _finish(cgroup)
    assert current <= 20
    usage = cgroup.report().usage
    assert usage is not None
    assert usage.pids_peak is None or usage.pids_peak <= 20


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_takes_a_setsid_double_forked_tree(plugin: CgroupV2Plugin, tmp_path: Path) -> None:
    cgroup = plugin.create(new_job_id(), JobSpec("sh"))
    leaf = tmp_path / "leaf.sh"
    leaf.write_text("echo $$; exec sleep 1000\n")
    # Six processes print their pid: two in a setsid'd session, an orphan in another.
    tree = (
        f"setsid sh -c 'sh {leaf} & sh {leaf} & echo $$; wait' & "
        f"(setsid sh {leaf} &); sh {leaf} & echo $$; wait"
    )
    proc = _start(cgroup, ["sh", "-c", tree], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with proc.stdout:
        pids = {int(proc.stdout.readline()) for _ in range(6)}
        assert pids <= set(cgroup.pids())
        assert len({os.getsid(pid) for pid in pids}) >= 3
        started = time.monotonic()
        _finish(cgroup)
        elapsed = time.monotonic() - started
    proc.wait(timeout=10)
    assert not [pid for pid in pids if _alive(pid)]
    assert "populated 0" in (cgroup.path / "cgroup.events").read_text()
    assert elapsed < 5
    cgroup.release()
    assert not cgroup.path.exists()

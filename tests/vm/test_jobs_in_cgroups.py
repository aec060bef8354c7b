"""Jobs through the JobManager with the cgroupv2 plugin, on a pure cgroup v2 kernel.

The plugin's own VM tests (test_cgroup_limits.py) start processes by hand; these go
through the real path: the zygote, the launcher joining the cgroup, the manager's status,
stop and clean-up. They run inside the test VM (tests/vm/run_vm.py).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from jobworker.backends.local.inotify import wait_until
from jobworker.backends.local.manager import JobManager
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec, Limits
from jobworker.model import TerminationReason
from jobworker.plugins.cgroupv2 import CgroupV2Plugin

CGROUP_FS = Path("/sys/fs/cgroup")
T = TypeVar("T")


def _pure_v2() -> bool:
    controllers = CGROUP_FS / "cgroup.controllers"
    return controllers.exists() and {"cpu", "memory", "pids"} <= set(
        controllers.read_text().split()
    )


pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(not _pure_v2(), reason="needs a pure cgroup v2 host: run in the VM"),
]


@pytest.fixture
def root() -> Path:
    return CGROUP_FS / f"jobworker-e2e-{secrets.token_hex(4)}"


def with_manager(root: Path, spool: Path, body: Callable[[JobManager], Awaitable[T]]) -> T:
    async def main() -> T:
        plugin = CgroupV2Plugin(root=root)
        plugin.setup()
        plugins = Plugins()
        plugins.register(plugin, name="cgroupv2")
        manager = JobManager(plugins, spool)
        try:
            return await body(manager)
        finally:
            await manager.shutdown()
            plugin.shutdown()

    return asyncio.run(asyncio.wait_for(main(), 300))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def output(manager: JobManager, job_id: str) -> bytes:
    return b"".join([c.data async for c in manager.follow(job_id)])


def test_contained_from_first_instruction_oom_reported_cpu_accounted(
    root: Path, tmp_path: Path
) -> None:
    async def body(m: JobManager) -> None:
        # `cat` reads its own cgroup: the first program of the job is already inside.
        job = await m.start(JobSpec("cat", ("/proc/self/cgroup",)), "alice")
        relative = (root / job.job_id).relative_to(CGROUP_FS)
        assert (await output(m, job.job_id)).decode() == f"0::/{relative}\n"
        assert job.containment == f"cgroupv2:{root / job.job_id}"

        # Four times the memory limit: the kernel's OOM killer ends it, and status says so.
        limit = 32 << 20
        hog = JobSpec(
            "sh",
            ("-c", "x=$(head -c 134217728 /dev/zero | tr '\\0' a); echo survived"),
            limits=Limits(memory=limit),
        )
        job = await m.start(hog, "alice")
        final = await m.wait(job.job_id)
        assert final.exit is not None and final.exit.reason is TerminationReason.OOM_KILLED
        assert final.exit.signal == signal.SIGKILL
        assert final.usage is not None and final.usage.memory_peak_bytes is not None
        assert limit * 0.5 < final.usage.memory_peak_bytes <= limit
        assert final.applied_limits.memory == limit

        # A CPU quota of 0.2 cores, seen in the job's own accounting.
        started = time.monotonic()
        job = await m.start(
            JobSpec("timeout", ("3", "sh", "-c", "while :; do :; done"), limits=Limits(cpu=0.2)),
            "alice",
        )
        final = await m.wait(job.job_id)
        wall = time.monotonic() - started
        assert final.usage is not None and final.usage.cpu_usage_usec is not None
        share = final.usage.cpu_usage_usec / 1e6 / wall
        assert 0.15 <= share <= 0.25, f"{share:.3f} of a CPU over {wall:.2f} s"
        assert final.usage.cpu_nr_throttled and final.usage.cpu_nr_throttled > 0
        assert not (root / job.job_id).exists()

    with_manager(root, tmp_path, body)


def test_stop_takes_setsid_double_forks_and_fork_bombs_leave_manager_healthy(
    root: Path, tmp_path: Path
) -> None:
    async def body(m: JobManager) -> None:
        # Escapees of the process group: a setsid'd pair, and a double-forked orphan.
        tree = (
            "trap '' TERM; setsid sh -c 'trap \"\" TERM; sleep 1000 & echo $!; wait' & "
            "(setsid sleep 1000 & echo $!) ; sleep 1000 & echo $!; wait"
        )
        job = await m.start(JobSpec("sh", ("-c", tree)), "alice")
        pids: list[int] = []
        async for chunk in m.follow(job.job_id):
            pids += [int(p) for p in chunk.data.split()]
            if len(pids) == 3:
                break
        assert len({os.getsid(pid) for pid in pids}) >= 2
        result = await m.stop(job.job_id, by="bob", grace=0.5)
        assert result.escalated  # everything ignored SIGTERM: cgroup.kill finished it
        assert result.status.exit is not None
        assert result.status.exit.reason is TerminationReason.STOPPED
        assert not [pid for pid in pids if alive(pid)]
        assert not (root / job.job_id).exists()

        # A fork bomb under pids=20 stays at 20 processes; the manager keeps working.
        bomb = await m.start(
            JobSpec(
                "sh", ("-c", "bomb() { bomb | bomb & }; bomb; sleep 1000"), limits=Limits(pids=20)
            ),
            "alice",
        )
        cgroup = root / bomb.job_id
        events = cgroup / "pids.events"

        def refused_a_fork() -> bool:
            return int(events.read_text().split()[1]) > 0

        await asyncio.wait_for(wait_until(events, refused_a_fork), 60)
        assert refused_a_fork()
        assert int((cgroup / "pids.current").read_text()) <= 20
        probe = await m.start(JobSpec("echo", ("still here",)), "alice")
        assert await output(m, probe.job_id) == b"still here\n"
        stopped = await m.stop(bomb.job_id, by="bob", grace=0.2)
        assert stopped.status.exit is not None
        assert not cgroup.exists()

    with_manager(root, tmp_path, body)


SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import structlog
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    from jobworker.plugins.cgroupv2 import CgroupV2Plugin
    from jobworker.hooks.host import Plugins
    from jobworker.backends.local.manager import JobManager
    from jobworker.jobspec import JobSpec

    async def main():
        plugin = CgroupV2Plugin(root=Path(sys.argv[1]))
        plugin.setup()
        plugins = Plugins()
        plugins.register(plugin, name="cgroupv2")
        manager = JobManager(plugins, Path(sys.argv[2]))
        for _ in range(3):
            job = await manager.start(
                JobSpec("sh", ("-c", "setsid sleep 1000 & echo $!; exec sleep 1000")), "a"
            )
            chunk = await anext(manager.follow(job.job_id))
            print(job.pid, chunk.data.decode().strip(), flush=True)
        print("ready", flush=True)
        await asyncio.sleep(1000)

    asyncio.run(main())
    """
)


def test_server_killed_then_restarted_leaves_nothing(root: Path, tmp_path: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(root), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    pids: list[int] = []
    with server.stdout:
        for line in server.stdout:
            if line.strip() == "ready":
                break
            pids += [int(p) for p in line.split()]
    assert len(pids) == 6 and all(alive(pid) for pid in pids)
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=30)
    leftovers = [p for p in root.iterdir() if p.is_dir()]
    assert len(leftovers) == 3  # nobody cleaned up: the server died

    restarted = CgroupV2Plugin(root=root)
    restarted.claim()  # a new server's start-up removes the crashed run's cgroups
    try:
        assert [p for p in root.iterdir() if p.is_dir()] == []
        assert not [pid for pid in pids if alive(pid)]
    finally:
        restarted.shutdown()


@pytest.fixture(autouse=True)
def _no_stray_root(root: Path) -> Iterator[None]:
    yield
    if root.exists():  # cleaned by the plugin that made it, or by a restarted one
        cleaner = CgroupV2Plugin(root=root)
        cleaner.setup()  # kills and removes leftover job cgroups
        cleaner.shutdown()
        root.rmdir()

"""Live restore on a pure cgroup v2 kernel: an adopted job keeps its cgroup and its limits,
enforced and reported as for a job the server started itself. Runs inside the test VM
(tests/vm/run_vm.py)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
from pathlib import Path

import pytest

from jobworker.backends.local.manager import JobManager
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec, Limits
from jobworker.model import JobState, TerminationReason
from jobworker.plugins.cgroupv2 import CgroupV2Plugin

CGROUP_FS = Path("/sys/fs/cgroup")
LIMIT = 32 << 20


def _pure_v2() -> bool:
    controllers = CGROUP_FS / "cgroup.controllers"
    return controllers.exists() and {"cpu", "memory", "pids"} <= set(
        controllers.read_text().split()
    )


pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(not _pure_v2(), reason="needs a pure cgroup v2 host: run in the VM"),
]


def _manager(root: Path, spool: Path) -> tuple[JobManager, Plugins, CgroupV2Plugin]:
    """What ``serve --live-restore --plugin cgroupv2`` builds."""
    plugin = CgroupV2Plugin(root=root, live_restore=True)
    plugin.setup()
    plugins = Plugins()
    plugins.register(plugin, name="cgroupv2")
    return JobManager(plugins, spool, live_restore=True), plugins, plugin


def test_an_adopted_job_keeps_its_limits_and_its_oom_is_reported(tmp_path: Path) -> None:
    root = CGROUP_FS / f"jobworker-live-{secrets.token_hex(4)}"
    trigger = tmp_path / "go"

    async def main() -> None:
        first, _plugins, first_plugin = _manager(root, tmp_path)
        # Waits for the trigger, then takes four times its memory limit.
        script = (
            f"echo ready; while [ ! -e {trigger} ]; do sleep 0.1; done;"
            " x=$(head -c 134217728 /dev/zero | tr '\\0' a); echo survived"
        )
        hog = JobSpec("sh", ("-c", script), limits=Limits(memory=LIMIT, pids=64))
        job = await first.start(hog, "alice")
        async for _chunk in first.follow(job.job_id):
            break
        await first.shutdown()  # --live-restore: the job goes on, in its cgroup
        first_plugin.shutdown()  # which stays; the root is let go

        second, plugins, plugin = _manager(root, tmp_path)
        try:
            second.restore()
            plugins.manager_ready(second)
            adopted = second.get(job.job_id)
            assert adopted.state is JobState.RUNNING
            assert adopted.containment == job.containment
            assert adopted.applied_limits == job.applied_limits
            assert (root / job.job_id / "memory.max").read_text().strip() == str(LIMIT)
            assert (root / job.job_id / "pids.max").read_text().strip() == "64"
            trigger.touch()
            final = await second.wait(job.job_id)
            assert final.exit is not None
            assert final.exit.reason is TerminationReason.OOM_KILLED
            assert final.exit.signal == signal.SIGKILL
            assert final.usage is not None and final.usage.memory_peak_bytes is not None
            assert final.usage.memory_peak_bytes <= LIMIT
            assert not (root / job.job_id).exists()
        finally:
            await second.shutdown()
            plugin.live_restore = False
            plugin.shutdown()  # what is left under the root
            with contextlib.suppress(OSError):
                root.rmdir()  # made by the first server

    asyncio.run(asyncio.wait_for(main(), 300))

"""Isolated jobs in real cgroups (pure cgroup v2, inside the test VM): the job's namespaces
must not weaken its containment, and its containment must not weaken its isolation.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from jobworker.backends.local.manager import JobManager
from jobworker.errors import InvalidArgument
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec, Limits, Network
from jobworker.model import Stream, TerminationReason
from jobworker.plugins.cgroupv2 import CgroupV2Plugin
from jobworker.plugins.isolation import Isolation
from tests.vm.test_jobs_in_cgroups import CGROUP_FS, _pure_v2

T = TypeVar("T")

pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(not _pure_v2(), reason="needs a pure cgroup v2 host: run in the VM"),
]


@pytest.fixture
def root() -> Path:
    return CGROUP_FS / f"jobworker-iso-{secrets.token_hex(4)}"


def with_manager(
    root: Path, spool: Path, body: Callable[[JobManager], Awaitable[T]], **cgroup: Any
) -> T:
    async def main() -> T:
        cgroups = CgroupV2Plugin(root=root, **cgroup)
        cgroups.setup()
        plugins = Plugins()
        plugins.register(cgroups, name="cgroupv2")
        # The VM has no network to give a private one (no route out, no nf_tables module).
        isolation = Isolation(hide=(str(spool),), network=Network.NONE)
        plugins.register(isolation, name="isolation")
        manager = JobManager(plugins, spool)
        try:
            return await body(manager)
        finally:
            await manager.shutdown()
            cgroups.shutdown()

    return asyncio.run(asyncio.wait_for(main(), 300))


async def first_line(manager: JobManager, job_id: str) -> str:
    chunk = await anext(manager.follow(job_id))
    return chunk.data.decode().splitlines()[0]


ESCAPE = (
    # Every way out a job could try from inside: its own cgroup root, the cgroup2 mount
    # (read-only), a fresh mount of the hierarchy (no CAP_SYS_ADMIN), a child cgroup.
    "for f in /sys/fs/cgroup/cgroup.procs /sys/fs/cgroup/../cgroup.procs; do"
    " echo $$ > $f 2>/dev/null && echo MOVED; done;"
    " mkdir /sys/fs/cgroup/out 2>/dev/null && echo MADE;"
    " mount -t cgroup2 none /mnt 2>/dev/null && echo MOUNTED;"
)


def test_job_cannot_leave_its_cgroup_and_stop_is_bounded(root: Path, tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        script = ESCAPE + " cat /proc/self/cgroup; trap '' TERM; echo armed; sleep 1000"
        job = await m.start(JobSpec("sh", ("-c", script)), "alice")
        lines = []
        async for chunk in m.follow(job.job_id):
            if chunk.stream is Stream.STDOUT:  # stderr has the refusals
                lines += chunk.data.decode().splitlines()
            if "armed" in lines:
                break
        assert lines == ["0::/", "armed"]  # no MOVED, MADE or MOUNTED
        procs = (root / job.job_id / "cgroup.procs").read_text().split()
        assert str(job.pid) in procs and len(procs) >= 2  # its PID 1 and sh stay in
        began = time.monotonic()
        result = await m.stop(job.job_id, by="bob", grace=1)
        assert time.monotonic() - began < 1 + 5
        assert result.escalated and result.status.exit is not None
        assert result.status.exit.reason is TerminationReason.STOPPED
        assert not (root / job.job_id).exists()

    with_manager(root, tmp_path, body)


def test_limits_hold_inside_the_namespaces(root: Path, tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
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
        assert final.usage.memory_peak_bytes <= limit
        assert final.uid is not None and 61184 <= final.uid <= 65519  # its own

        bomb = await m.start(
            JobSpec(
                "sh", ("-c", "bomb() { bomb | bomb & }; bomb; sleep 1000"), limits=Limits(pids=20)
            ),
            "alice",
        )
        await asyncio.sleep(2)
        assert int((root / bomb.job_id / "pids.current").read_text()) <= 20
        await m.stop(bomb.job_id, by="bob", grace=0.2)

        job = await m.start(JobSpec("sh", ("-c", "exit 4")), "alice")
        final = await m.wait(job.job_id)
        assert final.exit is not None and (final.exit.reason, final.exit.exit_code) == (
            TerminationReason.EXITED,
            4,
        )

    with_manager(root, tmp_path, body)


def test_a_job_without_memory_gets_the_default_and_none_gets_past_the_maximum(
    root: Path, tmp_path: Path
) -> None:
    """``serve --cgroup-default-memory 32M --cgroup-max-memory 64M``: a job that asks for
    no memory is bounded all the same, and one asking for more is refused."""

    async def body(m: JobManager) -> None:
        hog = "x=$(head -c 134217728 /dev/zero | tr '\\0' a); echo survived"
        job = await m.start(JobSpec("sh", ("-c", hog)), "alice")
        assert job.applied_limits.memory == 32 << 20
        final = await m.wait(job.job_id)
        assert final.exit is not None and final.exit.reason is TerminationReason.OOM_KILLED
        assert final.usage is not None and final.usage.memory_peak_bytes is not None
        assert final.usage.memory_peak_bytes <= 32 << 20
        with pytest.raises(InvalidArgument) as info:
            await m.start(JobSpec("true", limits=Limits(memory=128 << 20)), "alice")
        assert str(info.value) == (
            "memory 128M is above this server's maximum of 64M (--cgroup-max-memory):"
            " ask for at most 64M"
        )
        allowed = await m.start(JobSpec("true", limits=Limits(memory=64 << 20)), "alice")
        assert allowed.applied_limits.memory == 64 << 20
        await m.wait(allowed.job_id)

    with_manager(root, tmp_path, body, default_memory=32 << 20, max_memory=64 << 20)

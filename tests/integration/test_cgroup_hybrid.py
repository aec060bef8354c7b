"""The cgroupv2 plugin on a hybrid host: real containment and tree-kill, limits refused.

On a hybrid host /sys/fs/cgroup/unified is a cgroup2 mount without cpu, memory, io or pids
(they are bound to v1), so a job cgroup there can hold, signal, kill and watch processes but
enforce no limit. Every test works under its own fresh child of that mount and removes it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobworker.backends.local.isolation import DEFAULT_PIDS
from jobworker.backends.local.manager import JobManager
from jobworker.cli.top import chart
from jobworker.errors import FailedPrecondition
from jobworker.hooks.host import Plugins
from jobworker.jobspec import IoLimit, JobSpec, Limits
from jobworker.model import Stream, new_job_id
from jobworker.plugins.cgroupv2 import CgroupV2Plugin, JobCgroup, cgroup2_mounts
from jobworker.plugins.isolation import Isolation

UNIFIED = Path("/sys/fs/cgroup/unified")


def _skip_reason() -> str | None:
    with open("/proc/self/mountinfo") as f:
        mounts = cgroup2_mounts(f.read())
    if UNIFIED not in mounts:
        return f"{UNIFIED} is not a cgroup2 mount (not a hybrid-cgroup host)"
    if not os.access(UNIFIED, os.W_OK):
        return f"{UNIFIED} is not writable (needs root)"
    if set((UNIFIED / "cgroup.controllers").read_text().split()) & {"cpu", "memory", "pids"}:
        return f"{UNIFIED} offers limit controllers: these tests assume a hybrid host"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _force_remove(path: Path) -> None:
    """Teardown of last resort: kill and remove whatever a failed test left."""
    if not path.exists():
        return
    (path / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 5
    while "populated 1" in (path / "cgroup.events").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    for parent, dirs, _files in os.walk(path, topdown=False):
        for name in dirs:
            os.rmdir(os.path.join(parent, name))
    os.rmdir(path)


@pytest.fixture
def root() -> Iterator[Path]:
    path = UNIFIED / f"jobworker-test-{secrets.token_hex(4)}"
    try:
        yield path
    finally:
        _force_remove(path)


@pytest.fixture
def plugin(root: Path) -> Iterator[CgroupV2Plugin]:
    plugin = CgroupV2Plugin(root=root)
    plugin.setup()
    try:
        yield plugin
    finally:
        plugin.shutdown()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has run its last instruction


def _reap(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


def _spawn_tree(cgroup: JobCgroup, tmp_path: Path) -> tuple[subprocess.Popen[str], set[int]]:
    """Join ``cgroup`` first, like the launcher, then fork a tree that leaves the session.

    Every process prints its pid once it runs: the main shell, a setsid'd shell with two
    children, a setsid'd orphan (its parent subshell exits) and a plain child: six lines.
    """
    leaf = tmp_path / "leaf.sh"
    leaf.write_text("echo $$; exec sleep 1000\n")
    script = (
        f"echo 0 > {cgroup.join_path} || exit 1\n"
        f"setsid sh -c 'sh {leaf} & sh {leaf} & echo $$; wait' &\n"
        f"(setsid sh {leaf} &)\n"
        f"sh {leaf} &\n"
        "echo $$\n"
        "wait\n"
    )
    proc = subprocess.Popen(
        ["sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    pids = {int(proc.stdout.readline()) for _ in range(6)}
    cgroup.attach(proc.pid)
    return proc, pids


def test_kill_stops_a_setsid_double_forked_tree(
    plugin: CgroupV2Plugin, root: Path, tmp_path: Path
) -> None:
    cgroup = plugin.create(new_job_id(), JobSpec("sh"))
    proc, pids = _spawn_tree(cgroup, tmp_path)
    try:
        assert pids <= set(cgroup.pids())
        assert len({os.getsid(pid) for pid in pids}) >= 3  # two sessions escaped the job's

        async def kill_while_waiting() -> float:
            waiter = asyncio.create_task(cgroup.wait_empty())
            await asyncio.sleep(0.2)
            assert not waiter.done()  # populated: the watch is armed and blocked
            killed_at = time.monotonic()
            cgroup.kill()
            await asyncio.wait_for(waiter, timeout=5)
            return time.monotonic() - killed_at

        elapsed = asyncio.run(kill_while_waiting())
    finally:
        _reap(proc)
    # The kill takes milliseconds; the bound only leaves room for a loaded CI machine.
    assert elapsed < 2, f"wait_empty took {elapsed:.3f}s after cgroup.kill"
    assert not [pid for pid in pids if _alive(pid)]
    assert "populated 0" in (cgroup.path / "cgroup.events").read_text()
    report = cgroup.report()
    assert report.oom_killed is False
    assert report.usage is not None and report.usage.cpu_usage_usec is not None
    cgroup.release()
    assert not cgroup.path.exists()
    cgroup.release()  # idempotent


def test_signal_reaches_processes_outside_the_session(
    plugin: CgroupV2Plugin, tmp_path: Path
) -> None:
    cgroup = plugin.create(new_job_id(), JobSpec("sh"))
    proc, pids = _spawn_tree(cgroup, tmp_path)
    try:
        cgroup.signal(signal.SIGTERM)
        asyncio.run(asyncio.wait_for(cgroup.wait_empty(), timeout=5))
    finally:
        _reap(proc)
    assert not [pid for pid in pids if _alive(pid)]
    cgroup.release()


def test_leftovers_of_a_crashed_run_are_removed(root: Path, tmp_path: Path) -> None:
    crashed = CgroupV2Plugin(root=root)
    cgroup = crashed.create(new_job_id(), JobSpec("sh"))
    proc, pids = _spawn_tree(cgroup, tmp_path)
    assert crashed._lock is not None
    crashed._lock.release()  # what the kernel does when the server dies
    try:
        restarted = CgroupV2Plugin(root=root)
        restarted.claim()  # the server starting again after a crash
    finally:
        _reap(proc)
    assert not [pid for pid in pids if _alive(pid)]
    assert not cgroup.path.exists()
    restarted.shutdown()
    assert root.exists()  # the restarted server found it, so it is not its to remove


def _whole_disk() -> str | None:
    for entry in sorted(Path("/sys/dev/block").iterdir()):
        if not (entry / "partition").exists():
            return entry.name
    return None


@pytest.mark.parametrize(
    ("limits", "controller"),
    [
        (Limits(memory=64 << 20), "memory"),
        (Limits(cpu=0.5), "cpu"),
        (Limits(cpu_weight=50), "cpu"),
        (Limits(pids=10), "pids"),
        pytest.param(
            Limits(io=[IoLimit(device=_whole_disk() or "", wbps=1 << 20)]),
            "io",
            marks=pytest.mark.skipif(_whole_disk() is None, reason="no block device"),
        ),
    ],
)
def test_limits_are_refused_naming_the_controller(
    plugin: CgroupV2Plugin, root: Path, limits: Limits, controller: str
) -> None:
    plugin.pids_by_rlimit = False  # --no-isolation: no uid of the job's own to bound
    with pytest.raises(FailedPrecondition) as info:
        plugin.create(new_job_id(), JobSpec("true", limits=limits))
    message = str(info.value)
    assert f"cgroup v2 {controller!r} controller is not available at {UNIFIED}" in message
    assert "hugetlb" in message  # what the host does offer
    assert [p for p in root.iterdir() if p.is_dir()] == []  # nothing half-created


def test_no_limits_still_contains_without_a_pids_default(plugin: CgroupV2Plugin) -> None:
    cgroup = plugin.create(new_job_id(), JobSpec("true"))
    try:
        assert cgroup.applied == Limits()  # no pids controller: the default is not in force
        assert cgroup.name == f"cgroupv2:{cgroup.path}"
        assert plugin.enabled == frozenset()
    finally:
        cgroup.release()


def test_isolated_job_cannot_leave_its_cgroup(
    plugin: CgroupV2Plugin, root: Path, tmp_path: Path
) -> None:
    """The attack the isolation issue found: `echo $$ > <ancestor>/cgroup.procs`, which used
    to take the job out of its cgroup and make stop hang. Now each try fails, the job's
    processes stay in its cgroup, and a stop ends it within the grace period."""
    plugins = Plugins()
    plugins.register(plugin, name="cgroupv2")
    plugins.register(Isolation(), name="isolation")
    script = (
        "for f in /sys/fs/cgroup/cgroup.procs /sys/fs/cgroup/unified/cgroup.procs"
        f" {root}/cgroup.procs {UNIFIED}/cgroup.procs; do echo $$ > $f && echo MOVED; done;"
        " cat /proc/self/cgroup | grep '^0::'; trap '' TERM; echo armed; sleep 600"
    )

    async def body() -> None:
        manager = JobManager(plugins, tmp_path)
        try:
            job = await manager.start(JobSpec("sh", ("-c", script)), "mallory")
            out = b""
            async for chunk in manager.follow(job.job_id):
                if chunk.stream is Stream.STDOUT:
                    out += chunk.data
                if out.endswith(b"armed\n"):
                    break
            assert out == b"0::/\narmed\n"
            # "armed" may arrive before sh has forked sleep: give it a moment.
            for _ in range(100):
                procs = (root / job.job_id / "cgroup.procs").read_text().split()
                if len(procs) >= 5:
                    break
                await asyncio.sleep(0.05)
            # The relay, PID 1 and pasta (its private network), sh, sleep.
            assert str(job.pid) in procs and len(procs) == 5
            began = time.monotonic()
            result = await manager.stop(job.job_id, by="admin", grace=0.5)
            assert result.escalated and time.monotonic() - began < 0.5 + 5
            assert not (root / job.job_id).exists()
        finally:
            await manager.shutdown()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_pids_without_the_controller_bound_the_jobs_own_uid(
    plugin: CgroupV2Plugin, tmp_path: Path
) -> None:
    """No pids controller here: ``--pids`` (and the default) become the RLIMIT_NPROC of the
    job's own uid, instead of a refusal (or a default dropped after a log line)."""
    plugins = Plugins()
    plugins.register(plugin, name="cgroupv2")
    plugins.register(Isolation(), name="isolation")

    async def body() -> None:
        manager = JobManager(plugins, tmp_path)
        try:
            for limits, bound in ((Limits(pids=40), 40), (Limits(), 1024)):
                spec = JobSpec("grep", ("Max processes", "/proc/self/limits"), limits=limits)
                job = await manager.start(spec, "alice")
                out = b"".join([c.data async for c in manager.follow(job.job_id)])
                assert out.split()[2:4] == [str(bound).encode()] * 2, out
                assert job.applied_limits.pids is None  # not the cgroup's: the uid's
        finally:
            await manager.shutdown()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_usage_says_unknown_where_the_cgroup_cannot_measure(
    plugin: CgroupV2Plugin, tmp_path: Path
) -> None:
    """No memory or pids controller: a sample says None (``unknown``), never ``0B``; the
    status names what bounds the job and what nothing bounds."""
    plugins = Plugins()
    plugins.register(plugin, name="cgroupv2")
    plugins.register(Isolation(), name="isolation")

    async def body() -> None:
        manager = JobManager(plugins, tmp_path)
        try:
            hog = "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo held; sleep 600"
            job = await manager.start(JobSpec("sh", ("-c", hog)), "alice")
            async for chunk in manager.follow(job.job_id):
                if b"held" in chunk.data:
                    break
            for _ in range(100):
                usage = await manager.usage(job.job_id)
                if usage.samples and usage.samples[-1].cpu_usec > 0:
                    break
                await asyncio.sleep(0.1)
            last = usage.samples[-1]
            assert usage.source == "cgroupv2" and last.cpu_usec > 0
            assert (last.memory_bytes, last.pids, last.memory_peak_bytes) == (None, None, None)
            assert "memory  unknown: cgroupv2 cannot read it here" in chart(usage)
            assert job.enforced == (
                f"pids {DEFAULT_PIDS} (RLIMIT_NPROC of the job's uid)",
                "tmpfs 1G (/tmp, /var/tmp, /dev/shm together)",
                "memory: none",
            )
            await manager.stop(job.job_id, by="alice", grace=0.2)
        finally:
            await manager.shutdown()

    asyncio.run(asyncio.wait_for(body(), 60))

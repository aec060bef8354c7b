"""A job's usage is its command's, not jobworker's: an isolated job's PID 1 (and the
launcher's relay above it) is left out of MEM and PIDS, through the real job manager,
both ways of starting a job, isolated or not."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobworker.backends.local.manager import JobManager
from jobworker.backends.local.sampling import _helper_usage
from jobworker.backends.local.spawn import Spawner
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec, Network
from jobworker.plugins.isolation import Isolation
from jobworker.usage import UsageSample

#: Three processes of the user's: the shell and two sleeps.
SCRIPT = "sleep 60 & sleep 60 & echo ready; wait"
MIB = 1 << 20


def _session_rss(session: int, leave_out: set[int]) -> int:
    """Resident bytes of the session's processes, as a reader of /proc sums them."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in leave_out:
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        if int(fields[3]) == session:
            total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return total


def _sample(
    isolated: bool, zygote: bool, spool: Path, network: Network = Network.PRIVATE
) -> tuple[UsageSample, int, int]:
    """The job's newest sample once its three processes run, the resident bytes of every
    process of its session (jobworker's included), and how many processes that is."""

    async def body() -> tuple[UsageSample, int, int]:
        plugins = Plugins()
        isolation = Isolation(network=network)
        if not isolated:
            isolation.jobworker_configure(argparse.Namespace(no_isolation=True))
        plugins.register(isolation, name="isolation")
        plugins.load([])
        manager = JobManager(plugins, spool)
        manager._spawner = Spawner(use_zygote=zygote)
        try:
            job = await manager.start(JobSpec("sh", ("-c", SCRIPT)), "alice")
            async for chunk in manager.follow(job.job_id):
                if b"ready" in chunk.data:
                    break
            for _ in range(100):
                await asyncio.sleep(0.1)
                samples = (await manager.usage(job.job_id)).samples
                if samples and samples[-1].pids >= 3 and samples[-1].time > job.started_at + 1:
                    session = job.pid
                    everything = _session_rss(session, set())
                    count = sum(
                        1
                        for name in os.listdir("/proc")
                        if name.isdigit() and _in_session(name, session)
                    )
                    return samples[-1], everything, count
            raise AssertionError(f"no sample with the job's 3 processes: {samples}")
        finally:
            await manager.shutdown()

    return asyncio.run(asyncio.wait_for(body(), 60))


def _in_session(name: str, session: int) -> bool:
    try:
        raw = Path(f"/proc/{name}/stat").read_bytes()
    except OSError:
        return False
    return int(raw[raw.rfind(b")") + 2 :].split()[3]) == session


@pytest.mark.parametrize("network", [Network.NONE, Network.PRIVATE], ids=lambda n: n.value)
@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "launcher"])
def test_an_isolated_job_counts_its_command_not_jobworkers_init(
    zygote: bool, network: Network, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("isolation as root: the server's own mode on a production host")
    sample, everything, count = _sample(True, zygote, tmp_path, network)
    assert sample.pids == 3
    # PID 1 (and the relay, and a private network's pasta beside PID 1) are there, not
    # counted; a private network always has the relay.
    assert count == {Network.NONE: 4 if zygote else 5, Network.PRIVATE: 6}[network]
    # PID 1 is a Python interpreter (about 9 MiB resident): it is not in the figure.
    assert sample.memory_bytes < everything - 4 * MIB, (sample, everything)
    assert sample.cpu_usec >= 0


def test_a_job_without_isolation_has_nothing_to_leave_out(tmp_path: Path) -> None:
    sample, everything, count = _sample(False, True, tmp_path)
    assert sample.pids == count == 3
    assert abs(sample.memory_bytes - everything) < MIB


#: A relay's shape: two children (PID 1 and pasta, say), one of them with a child of its
#: own (the command). Each writes its pid once it runs.
TREE = """
import os, time
def say():  # one write per line: four processes share the pipe
    os.write(1, b"%d\\n" % os.getpid())
def child(grandchild):
    if os.fork() == 0:
        if grandchild and os.fork() == 0:
            say(); time.sleep(60)
        say(); time.sleep(60)
child(True); child(False)
say(); time.sleep(60)
"""


def test_the_helper_levels_of_a_tree_are_counted_from_a_cgroups_figures() -> None:
    """What is taken off a cgroup's memory.current and pids.current: the top levels."""
    tree = subprocess.Popen(
        [sys.executable, "-c", TREE], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert tree.stdout is not None
        pids = {int(tree.stdout.readline()) for _ in range(4)}
        assert tree.pid in pids
        time.sleep(0.2)  # every one is past its print, in its sleep
        rss = {pid: _rss_pages(pid) for pid in pids}
        children = set(_children(tree.pid))
        grandchild = (pids - children - {tree.pid}).pop()
        assert _helper_usage(tree.pid, 1) == (rss[tree.pid], 1)
        assert _helper_usage(tree.pid, 2) == (rss[tree.pid] + sum(rss[c] for c in children), 3)
        assert _helper_usage(tree.pid, 0) == (0, 0)
        assert grandchild not in children
    finally:
        os.killpg(tree.pid, signal.SIGKILL)
        tree.wait()
        assert tree.stdout is not None
        tree.stdout.close()


def _rss_pages(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rfind(b")") + 2 :].split()[21])


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

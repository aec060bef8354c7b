"""Usage sampled from ``/proc`` through real processes: what a sample counts, and how soon
a process that appears, dies or leaves its job's session is seen."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from jobworker.backends.local.sampling import ProcTable, UsageSampler
from jobworker.usage import UsageSample

#: A job's leader that, for each line on stdin, forks a child and prints its pid. The child
#: holds 64 MiB it wrote (resident) and calls setsid on SIGUSR1; the kernel reaps it.
LEADER = """
import os, signal, sys, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
for line in sys.stdin:
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGUSR1, lambda *_: os.setsid())
        held = b"x" * (64 << 20)
        os.write(1, b"ready\\n")
        while True:
            time.sleep(60)
    print(child, flush=True)
"""
MIB = 1 << 20


class Leader:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LEADER],
            start_new_session=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.pid = self.proc.pid

    def fork(self) -> int:
        """A new child, once its 64 MiB are resident."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"fork\n")
        self.proc.stdin.flush()
        lines = {self.proc.stdout.readline().strip() for _ in range(2)}
        lines.discard(b"ready")
        return int(lines.pop())

    def end(self) -> None:
        os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            assert pipe is not None
            pipe.close()


@pytest.fixture
def leader() -> Iterator[Leader]:
    one = Leader()
    yield one
    one.end()


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_proc_sampling_sums_the_session() -> None:
    busy = (
        "import os, time\n"
        "if os.fork():\n"
        "    print('forked', flush=True)\n"
        "end = time.time() + 0.3\n"
        "while time.time() < end: pass\n"
        "time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", busy], start_new_session=True, stdout=subprocess.PIPE
    )
    table = ProcTable()
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"forked\n"
        time.sleep(0.5)
        found = table.sample([proc.pid, 999_999_999])
    finally:
        table.close()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    assert list(found) == [proc.pid]
    usage = found[proc.pid]
    assert usage.pids == 2  # both sides of the fork
    assert usage.cpu_usec > 0 and usage.memory_bytes > 0
    assert usage.io_read_bytes is not None  # our own processes: /proc/PID/io is readable
    assert os.getsid(0) not in found


def test_a_cpu_bound_job_rises_between_ticks() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    table = ProcTable()
    try:
        first = table.sample([proc.pid])[proc.pid]
        # Ticks until it has had 0.1 s more CPU: how soon depends on the machine's load (a
        # fixed 0.5 s gave it only 0.08 s at a load of 20 on 2 cores), that it rises does not.
        deadline = time.monotonic() + 30
        second = first
        while second.cpu_usec - first.cpu_usec < 100_000 and time.monotonic() < deadline:
            time.sleep(0.1)
            second = table.sample([proc.pid])[proc.pid]
    finally:
        table.close()
        proc.kill()
        proc.wait()
    assert second.cpu_usec - first.cpu_usec >= 100_000


def test_a_child_forked_later_counts_from_the_next_tick_and_drops_out_when_it_goes(
    leader: Leader,
) -> None:
    table = ProcTable()
    child = 0
    try:
        alone = table.sample([leader.pid])[leader.pid]
        assert (alone.pids, table.open_files) == (1, 1)
        child = leader.fork()
        both = table.sample([leader.pid])[leader.pid]
        assert (both.pids, table.open_files) == (2, 2)
        assert both.memory_bytes - alone.memory_bytes >= 60 * MIB  # the child's 64 MiB
        # Leaving the session (setsid) takes it out of the job, and its file is closed.
        os.kill(child, signal.SIGUSR1)
        _wait_until(lambda: os.getsid(child) == child)
        left = table.sample([leader.pid])[leader.pid]
        assert (left.pids, table.open_files) == (1, 1)
        # So does dying: a second child, killed and reaped.
        other = leader.fork()
        assert table.sample([leader.pid])[leader.pid].pids == 2
        os.kill(other, signal.SIGKILL)
        _wait_until(lambda: not os.path.exists(f"/proc/{other}"))
        gone = table.sample([leader.pid])[leader.pid]
        assert (gone.pids, table.open_files) == (1, 1)
    finally:
        table.close()
        if child:
            os.kill(child, signal.SIGKILL)  # no longer in the leader's process group
    assert table.open_files == 0


def test_past_its_descriptor_cap_the_table_reads_by_path(leader: Leader) -> None:
    table = ProcTable(max_open=1)
    try:
        leader.fork()
        usage = table.sample([leader.pid])[leader.pid]
        assert (usage.pids, table.open_files) == (2, 1)
        assert usage.memory_bytes >= 64 * MIB
    finally:
        table.close()


def test_a_session_seen_before_its_job_was_tracked_is_counted(leader: Leader) -> None:
    table = ProcTable()
    try:
        assert table.sample([999_999_999]) == {}  # the leader is seen, as no job's
        usage = table.sample([999_999_999, leader.pid])  # a new job: everything read again
        assert usage[leader.pid].pids == 1
    finally:
        table.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _stat_files() -> int:
    """Descriptors of this process open on a ``/proc/PID/stat`` (the sampler's per-process
    files): counted by what they are, since the sampler's thread may hold a transient one
    (its listing of /proc) at the moment all are counted."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            count += target.startswith("/proc/") and target.endswith("/stat")
    return count


class _Fixed:
    """A containment that samples itself: keeps the sampler running with no /proc job."""

    def sample_usage(self) -> UsageSample:
        return UsageSample(time.time(), 0, 0, 1)


def test_the_sampler_closes_every_file_once_its_proc_jobs_are_over() -> None:
    async def main() -> None:
        before = _fds()
        sampler = UsageSampler(interval=0.05)
        sampler.track("self-sampled", 1, _Fixed())
        procs = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(5)]
        try:
            for proc in procs:
                sampler.track(str(proc.pid), proc.pid, None)
            for _ in range(100):
                await asyncio.sleep(0.05)
                if all(sampler.get(str(p.pid)).samples for p in procs):  # type: ignore[union-attr]
                    break
            assert _stat_files() == 5  # one stat file per process
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
                sampler.finished(str(proc.pid))
        # Still sampling the other job, but holding no /proc file.
        for _ in range(100):
            await asyncio.sleep(0.05)
            if _fds() == before:
                break
        assert _fds() == before
        await sampler.close()
        assert _fds() == before

    asyncio.run(main())


def test_when_the_last_job_ends_the_sampler_closes_its_files_at_once() -> None:
    """Not a period later: a server with no job running holds no /proc descriptor (the
    reliability test counts them as soon as its jobs are reaped)."""

    async def main() -> None:
        sampler = UsageSampler(interval=30.0)  # a tick this long would not come in time
        proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
        try:
            sampler.track("job", proc.pid, None)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if sampler.get("job").samples:  # type: ignore[union-attr]
                    break
            assert _stat_files() == 1  # counted by what they are: see _stat_files
        finally:
            proc.kill()
            proc.wait()
        sampler.finished("job")
        for _ in range(3):  # a few turns of the loop, far less than the period
            await asyncio.sleep(0)
        assert _stat_files() == 0
        assert sampler.get("job").samples  # type: ignore[union-attr]  # kept with the job
        await sampler.close()

    asyncio.run(main())

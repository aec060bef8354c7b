"""One uid per job and the kernel bounds of every job, through real servers and real jobs.

What the tenancy issue found shared between clients' jobs (one ``nobody`` for all: its
keyring, its process count) and unbounded (tmpfs mounts of half the host's memory each,
no pids bound on a host without the v2 pids controller), tried again from inside jobs.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from jobworker.backends.local.isolation import DEFAULT_PIDS, IsolationPlan
from jobworker.backends.local.manager import JobManager
from jobworker.backends.local.uids import DEFAULT_RANGE, UidRange
from jobworker.errors import ResourceExhausted
from jobworker.hooks import hookimpl
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec, Limits
from jobworker.model import JobStatus, Stream
from jobworker.plugins.isolation import Isolation
from jobworker.v1 import jobworker_pb2 as pb
from tests.serverfixtures import RPC_TIMEOUT_S, RunningServer, start_job, wait_exited

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switches jobs to their uids: root")


def _lone_uid() -> int:
    """A uid of no account for servers with a range of one, one per test process: runs
    of this file side by side (suites of several people on one host) draw different ones,
    and the host's lock file keeps any other server off it while a test holds it."""
    for offset in range(1000):
        uid = 59000 + (os.getpid() + offset) % 1000
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise AssertionError("every uid of 59000-59999 is an account here")


LONE_UID = _lone_uid()

#: keyctl(2) and add_key(2) from inside a job, through ctypes; each prints what it got
#: (a serial, the bytes read, or -errno).
KEYS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
ADD_KEY, KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
def done(r): return r if r >= 0 else -ctypes.get_errno()
def keyctl(*args): return done(libc.syscall(KEYCTL, *[ctypes.c_long(a) for a in args]))
def add(ring, name, data):
    return done(libc.syscall(ADD_KEY, b"user", name.encode(), data.encode(),
                             ctypes.c_size_t(len(data)), ctypes.c_long(ring)))
def read(serial):
    buf = ctypes.create_string_buffer(4096)
    n = done(libc.syscall(KEYCTL, ctypes.c_long(11), ctypes.c_long(serial), buf,
                          ctypes.c_long(4096)))
    return buf.raw[:n] if n >= 0 else n
def search(ring, name):
    return done(libc.syscall(KEYCTL, ctypes.c_long(10), ctypes.c_long(ring), b"user",
                             name.encode(), ctypes.c_long(0)))
USER, USER_SESSION, SESSION = -4, -5, -3
"""
EACCES, ENOKEY = 13, 126


def keys_job(script: str) -> JobSpec:
    return JobSpec("python3", ("-c", KEYS + script))


def run_sh(server: RunningServer, who: str, script: str) -> tuple[pb.JobStatusResponse, str]:
    stub = server.stub(who)
    job_id = start_job(stub, "sh", "-c", script)
    out = b"".join(
        c.data
        for c in stub.StreamOutput(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        if c.stream == "stdout"
    )
    return wait_exited(stub, job_id), out.decode()


def first_line(server: RunningServer, who: str, job_id: str, timeout: float = RPC_TIMEOUT_S) -> str:
    chunks = server.stub(who).StreamOutput(pb.JobRequest(job_id=job_id), timeout=timeout)
    out = b""
    for chunk in chunks:
        out += chunk.data if chunk.stream == "stdout" else b""
        if b"\n" in out:
            return out.split(b"\n", 1)[0].decode()
    raise AssertionError(f"the job ended without a line: {out!r}")


# -- through the real server, two clients ---------------------------------------------------


def test_two_clients_concurrent_jobs_have_different_uids(api_server: RunningServer) -> None:
    jobs = {}
    for who in ("alice", "bob", "alice"):
        job_id = start_job(api_server.stub(who), "sh", "-c", "id -u; id -G; exec sleep 600")
        jobs[job_id] = who
    try:
        uids = {}
        for job_id, who in jobs.items():
            status = api_server.stub(who).GetStatus(pb.JobRequest(job_id=job_id))
            assert status.status == "running"
            line = first_line(api_server, who, job_id)
            assert line == str(status.uid)
            assert status.user == f"job-{status.uid}"
            uids[job_id] = status.uid
        assert len(set(uids.values())) == 3, uids  # one each, alice's two jobs too
        assert all(uid in UidRange.parse(DEFAULT_RANGE) for uid in uids.values())
    finally:
        for job_id, who in jobs.items():
            api_server.stub(who).StopJob(pb.JobRequest(job_id=job_id, grace_seconds=1))


def test_a_key_one_job_adds_is_invisible_to_another_clients_job(
    api_server: RunningServer,
) -> None:
    plant = (
        "u = add(USER, 'alice-secret', 'hunter2'); s = add(SESSION, 'alice-session', 'pw2');"
        " print(u, s, read(u), flush=True); import time; time.sleep(600)"
    )
    alice = start_job(api_server.stub("alice"), "python3", "-c", KEYS + plant)
    try:
        serial_user, serial_session, readback = first_line(api_server, "alice", alice).split(" ", 2)
        assert int(serial_user) > 0 and int(serial_session) > 0 and readback == "b'hunter2'"
        steal = (
            f"print(read({serial_user}), read({serial_session}));"
            " print(search(USER, 'alice-secret'), search(SESSION, 'alice-session'));"
            " print(open('/proc/keys').read().count('alice-'))"
        )
        stub = api_server.stub("bob")
        bob = start_job(stub, "python3", "-c", KEYS + steal)
        out = b"".join(c.data for c in stub.StreamOutput(pb.JobRequest(job_id=bob)))
        lines = out.decode().splitlines()
        assert wait_exited(stub, bob).exit_code == 0, out
        # Neither key readable by serial, not found by name, not even listed.
        assert lines[0] in (f"-{EACCES} -{EACCES}", f"-{ENOKEY} -{ENOKEY}"), lines
        assert lines[1:] == [f"-{ENOKEY} -{ENOKEY}", "0"], lines
    finally:
        api_server.stub("alice").StopJob(pb.JobRequest(job_id=alice, grace_seconds=1))


# -- a server with a range of one uid: reuse ------------------------------------------------


@asynccontextmanager
async def lone_uid_manager(spool: Path, *writable: str) -> AsyncIterator[JobManager]:
    plugins = Plugins()
    isolation = Isolation(uid_range=UidRange(LONE_UID, LONE_UID), writable=writable)
    plugins.register(isolation, name="isolation")
    plugins.load([])
    manager = JobManager(plugins, spool)
    try:
        yield manager
    finally:
        await manager.shutdown()
        isolation.jobworker_shutdown()


async def output(manager: JobManager, job_id: str) -> str:
    chunks = [c.data async for c in manager.follow(job_id) if c.stream is Stream.STDOUT]
    return b"".join(chunks).decode()


async def start_when_free(
    manager: JobManager, spec: JobSpec, owner: str = "bob", seconds: float = 20
) -> JobStatus:
    """Start ``spec`` once the lone uid is back (its checks run after the job ends)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await manager.start(spec, owner)
        except ResourceExhausted:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 120))


def test_a_reused_uid_starts_with_empty_keyrings_its_last_job_could_not_lock(
    tmp_path: Path,
) -> None:
    plant = (
        "u = add(USER, 'left-behind', 'hunter2'); us = add(USER_SESSION, 'left-too', 'x');"
        # Keep setattr, or take write away from the uid: both need setattr, which is gone.
        " print(u, us, keyctl(5, USER, 0x3F3F0000), keyctl(5, USER, 0x3F010000), read(u))"
    )

    async def body() -> None:
        async with lone_uid_manager(tmp_path) as manager:
            first = await start_when_free(manager, keys_job(plant), "alice")
            u, us, keep, lock, readback = (await output(manager, first.job_id)).split()
            assert (keep, lock, readback) == (f"-{EACCES}", f"-{EACCES}", "b'hunter2'")
            steal = f"print(read({u}), read({us}), read(USER), read(USER_SESSION))"
            second = await start_when_free(manager, keys_job(steal))
            assert second.uid == first.uid == LONE_UID
            # Both keys unreadable (gone, or unlinked and not yet collected: an RCU grace
            # period), both keyrings empty (a keyring reads as its members' serials).
            old_user, old_session, *rings = (await output(manager, second.job_id)).split()
            assert {old_user, old_session} <= {f"-{ENOKEY}", f"-{EACCES}"}
            assert rings == ["b''", "b''"]

    run(body)


class _SeesPlans:
    """Runs after the built-in isolation plugin: the moment a uid is drawn."""

    def __init__(self) -> None:
        self.drawn = asyncio.Event()

    @hookimpl
    def jobworker_isolate(self, plan: IsolationPlan | None) -> None:
        self.drawn.set()


def test_a_start_cancelled_after_its_uid_was_drawn_gives_it_back(tmp_path: Path) -> None:
    """A client that hangs up mid-start must not keep a uid: 4336 of those would empty
    the default range."""

    async def body() -> None:
        async with lone_uid_manager(tmp_path) as manager:
            seen = _SeesPlans()
            manager._plugins.register(seen, name="sees-plans")
            start = asyncio.ensure_future(manager.start(JobSpec("sleep", ("600",)), "alice"))
            await seen.drawn.wait()  # the start now waits at its first await past the plan
            start.cancel()
            with pytest.raises(asyncio.CancelledError):
                await start
            job = await start_when_free(manager, JobSpec("id", ("-u",)))
            assert await output(manager, job.job_id) == f"{LONE_UID}\n"

    run(body)


def test_a_uid_is_not_reused_while_a_process_of_its_last_job_lives(tmp_path: Path) -> None:
    """A process with the uid outside the job's PID namespace (which the namespace's end
    cannot kill: here one the test starts, as an escaped or stuck process would be)."""

    async def body() -> None:
        async with lone_uid_manager(tmp_path) as manager:
            first = await start_when_free(manager, JobSpec("sleep", ("600",)), "alice")
            setpriv = ["setpriv", f"--reuid={LONE_UID}", f"--regid={LONE_UID}", "--clear-groups"]
            straggler = subprocess.Popen([*setpriv, "sleep", "600"])
            try:
                await manager.stop(first.job_id, by="alice", grace=0.5)
                await asyncio.sleep(1.5)  # its checks have run by now, and found the process
                with pytest.raises(ResourceExhausted) as info:
                    await manager.start(JobSpec("true"), "bob")
                assert f"the 1 uids of --job-uid-range {LONE_UID}-{LONE_UID}" in str(info.value)
                assert "1 wait until an earlier job's processes or files are gone" in str(
                    info.value
                )
            finally:
                straggler.kill()
                straggler.wait()
            second = await start_when_free(manager, JobSpec("id", ("-u",)))
            assert await output(manager, second.job_id) == f"{LONE_UID}\n"

    run(body)


def test_a_uid_is_not_reused_while_it_owns_a_file_in_a_writable_directory(
    tmp_path: Path, job_tmp_path: Path
) -> None:
    async def body() -> None:
        async with lone_uid_manager(tmp_path, str(job_tmp_path)) as manager:
            first = await start_when_free(
                manager, JobSpec("touch", (f"{job_tmp_path}/mine",)), "alice"
            )
            await manager.wait(first.job_id)
            assert (job_tmp_path / "mine").stat().st_uid == LONE_UID
            await asyncio.sleep(1.5)
            with pytest.raises(ResourceExhausted):
                await manager.start(JobSpec("true"), "bob")
            (job_tmp_path / "mine").unlink()
            second = await start_when_free(manager, JobSpec("ls", ("-A", str(job_tmp_path))))
            assert second.uid == LONE_UID
            assert await output(manager, second.job_id) == ""
            # Empty because the directory is, not because ls could not read it.
            listed = await manager.wait(second.job_id)
            assert listed.exit is not None and listed.exit.exit_code == 0

    run(body)


# -- kernel bounds of a default job ----------------------------------------------------------


def test_writing_2_gib_to_dev_shm_fails_with_enospc(api_server: RunningServer) -> None:
    _, out = run_sh(
        api_server,
        "alice",
        "dd if=/dev/zero of=/dev/shm/big bs=1M count=2048 2>&1 | head -1;"
        " df -B1 --output=size /dev/shm | tail -1; stat -f -c %i /tmp /var/tmp /dev/shm | sort -u | wc -l",
    )
    error, size, filesystems = out.splitlines()
    assert error == "dd: error writing '/dev/shm/big': No space left on device"
    assert int(size) == 1 << 30  # the default --job-tmp-size
    assert filesystems == "1"  # /tmp, /var/tmp and /dev/shm share that one size


def test_1500_forks_in_a_default_job_stop_at_the_bound(api_server: RunningServer) -> None:
    forks = (
        "import errno, os\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(1500):\n"
        "        if os.fork() == 0:\n"
        "            os.execv('/bin/sleep', ['sleep', '600'])\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('stopped', n, errno.errorcode[e.errno])\n"
        "else:\n"
        "    print('forked', n)\n"
    )
    stub = api_server.stub("alice")
    job_id = start_job(stub, "python3", "-c", forks)
    try:
        # 1023 fork+execs take seconds; on a loaded machine, tens of them.
        line = first_line(api_server, "alice", job_id, timeout=180)
        # The python process is the uid's first: 1023 more, then EAGAIN.
        assert line == f"stopped {DEFAULT_PIDS - 1} EAGAIN"
    finally:
        stub.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=0))


def test_pids_and_memory_bound_the_uid_and_the_tmpfs(api_server: RunningServer) -> None:
    """``--pids`` sets the job's RLIMIT_NPROC, ``--memory`` caps its tmpfs: the plan (the
    limits themselves need the cgroupv2 plugin, tested in the VM); a default job's."""
    plugins = Plugins()
    isolation = Isolation()
    plugins.register(isolation, name="isolation")
    plugins.load([])
    spec = JobSpec("true", limits=Limits(pids=40, memory=256 << 20))
    plan = plugins.isolate("job-a", spec, "alice")
    try:
        assert plan is not None and plan.account.dynamic
        assert (plan.nproc, plan.tmp_size) == (40, 256 << 20)
        assert plan.enforced() == [
            "pids 40 (RLIMIT_NPROC of the job's uid)",
            "tmpfs 256M (/tmp, /var/tmp, /dev/shm together)",
        ]
    finally:
        isolation.jobworker_start_refused("job-a")
        isolation.jobworker_shutdown()
    _, out = run_sh(api_server, "alice", "grep 'Max processes' /proc/self/limits")
    assert out.split()[2:4] == [str(DEFAULT_PIDS)] * 2

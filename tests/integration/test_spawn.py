"""Both ways a job's process starts: the zygote and the posix_spawned launcher."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from jobworker.backends.local.spawn import LAUNCHER, Spawned, Spawner
from jobworker.errors import SpawnError
from jobworker.jobspec import JobSpec


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, True)
    parts = []
    while part := os.read(fd, 65536):
        parts.append(part)
    return b"".join(parts)


def our_children() -> set[int]:
    """Pids whose parent is this process, zombies included."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def finish(sp: Spawned) -> tuple[bytes, bytes, int]:
    out, err = read_all(sp.stdout), read_all(sp.stderr)
    _, status = os.waitpid(sp.pid, 0)
    for fd in (sp.stdout, sp.stderr, sp.pidfd):
        os.close(fd)
    return out, err, status


@pytest.fixture(params=[True, False], ids=["zygote", "launcher"])
def spawner(request: pytest.FixtureRequest) -> Spawner:
    return Spawner(use_zygote=request.param)


def test_child_of_server_in_own_session(spawner: Spawner) -> None:
    script = "echo $PPID; ps -o sid= -p $$; echo $$; echo oops >&2; exit 4"

    async def main() -> tuple[bytes, bytes, int]:
        try:
            return finish(await spawner.spawn(JobSpec("sh", ("-c", script)), None))
        finally:
            spawner.close()

    out, err, status = asyncio.run(main())
    ppid, sid, pid = out.split()
    assert int(ppid) == os.getpid()  # the server reaps it, whichever path started it
    assert sid == pid
    assert err == b"oops\n"
    assert os.waitstatus_to_exitcode(status) == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (JobSpec("no-such-command-xyz"), "cannot execute 'no-such-command-xyz': No such file"),
        (JobSpec("true", cwd="/no/such"), "cannot use working directory '/no/such': No such"),
        (JobSpec("/etc/passwd"), "cannot execute '/etc/passwd': Permission denied"),
    ],
)
def test_exec_failures_carry_the_os_reason(spawner: Spawner, spec: JobSpec, message: str) -> None:
    async def main() -> None:
        try:
            with pytest.raises(SpawnError, match=message):
                await spawner.spawn(spec, None)
        finally:
            spawner.close()

    before = set(os.listdir("/proc/self/fd"))
    children = our_children()
    asyncio.run(main())
    assert set(os.listdir("/proc/self/fd")) <= before  # no descriptor leaked
    assert our_children() <= children  # and no process left behind, zombie or not


def test_dead_zygote_falls_back_then_recovers() -> None:
    spawner = Spawner()

    async def main() -> list[bytes]:
        outs = []
        try:
            outs.append(finish(await spawner.spawn(JobSpec("echo", ("1",)), None))[0])
            zygote = spawner._zygote
            assert zygote is not None
            os.kill(zygote.pid, signal.SIGKILL)
            outs.append(finish(await spawner.spawn(JobSpec("echo", ("2",)), None))[0])
            outs.append(finish(await spawner.spawn(JobSpec("echo", ("3",)), None))[0])
            assert spawner._zygote is not None and spawner._zygote.pid != zygote.pid
        finally:
            spawner.close()
        return outs

    assert asyncio.run(main()) == [b"1\n", b"2\n", b"3\n"]


def test_the_launcher_imports_no_package_and_nothing_slow(tmp_path: Path) -> None:
    """The launcher loads its own modules by path and imports only what the interpreter has
    built in or frozen: not the jobworker package (an isolated interpreter has no path to
    it), nor ``re``, ``enum``, ``json`` or ``importlib``, each milliseconds on every start."""
    memfd = os.memfd_create("launch")
    os.write(memfd, "\0".join(["/bin/true", "", "", "0", "0"]).encode())
    os.lseek(memfd, 0, os.SEEK_SET)
    status_r, status_w = os.pipe()
    argv = [sys.executable, "-X", "importtime", "-I", "-S", LAUNCHER]
    with open(os.devnull, "r+b") as null, open(tmp_path / "importtime", "wb") as err:
        fds = [memfd, null.fileno(), err.fileno(), status_w, null.fileno(), null.fileno()]
        actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds)]
        pid = os.posix_spawn(sys.executable, argv, {}, file_actions=actions)
    os.close(status_w)
    os.close(memfd)
    report = read_all(status_r)
    os.close(status_r)
    _, status = os.waitpid(pid, 0)
    assert (report, status) == (b"", 0)
    lines = (tmp_path / "importtime").read_text().splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines[1:]}
    assert "os" in imported, lines  # importtime saw the launcher's own imports
    slow = ("jobworker", "re", "enum", "json", "signal", "importlib", "warnings")
    assert {name for name in imported if name.split(".")[0] in slow} == set()

"""Starting a job's process without forking the server.

``os.posix_spawn`` (glibc's ``clone(CLONE_VM|CLONE_VFORK)``) runs no Python code in the child,
so it is safe beside grpcio's threads where ``fork`` and ``preexec_fn`` are not
(grpc/grpc#37259). The spawned program is :mod:`jobworker._launcher`, which joins the job's
containment and ``execve``s the command; see docs/spawning.md for the reasoning and costs.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sys
from pathlib import Path

import attrs

from jobworker.errors import SpawnError
from jobworker.model import JobSpec

LAUNCHER = str(Path(__file__).with_name("_launcher.py"))
#: Bigger pipes let a chatty job run ahead of the reader between event-loop turns.
PIPE_SIZE = 1 << 20
_STEP_MESSAGES = {
    "exec": "cannot execute {what!r}: {error}",
    "cwd": "cannot use working directory {what!r}: {error}",
    "join": "cannot join the job's containment {what!r}: {error}",
}


@attrs.frozen
class Spawned:
    """A running job process; the caller owns every descriptor."""

    pid: int
    pidfd: int  # readable once the process has exited
    stdout: int  # non-blocking read ends
    stderr: int


def _above_stdio(fd: int) -> int:
    """Move ``fd`` above 0-3 so the child's dup2 plan cannot clobber it."""
    if fd > 3:
        return fd
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 4)
    os.close(fd)
    return high


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    return _above_stdio(r), _above_stdio(w)


def resolve_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, resolve_future, fut)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def _read_to_eof(fd: int) -> bytes:
    parts: list[bytes] = []
    while True:
        await _wait_readable(fd)
        part = os.read(fd, 65536)
        if not part:
            return b"".join(parts)
        parts.append(part)


def _kill_and_reap(pid: int, pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)  # the launcher dies at once: no real wait


async def spawn(spec: JobSpec, join_path: str | None) -> Spawned:
    """Start ``spec`` through the launcher; return once the command itself is running.

    Raises SpawnError with the OS reason when the command cannot be executed; nothing is
    left behind then (the launcher is reaped, every descriptor closed).
    """
    fields = [spec.command, spec.cwd or "", join_path or "", str(len(spec.args)), *spec.args]
    fields += [f"{k}={v}" for k, v in spec.job_env().items()]
    instructions = "\0".join(fields).encode("utf-8", "surrogateescape")
    memfd = _above_stdio(os.memfd_create("jobworker-launch", os.MFD_CLOEXEC))
    out_r = out_w = err_r = err_w = st_r = st_w = -1
    pid = pidfd = -1
    try:
        os.write(memfd, instructions)
        os.lseek(memfd, 0, os.SEEK_SET)
        out_r, out_w = _pipe()
        err_r, err_w = _pipe()
        st_r, st_w = _pipe()
        for w in (out_w, err_w):
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # over /proc/sys/fs/pipe-max-size for unprivileged users: keep default
        try:
            pid = os.posix_spawn(  # noqa: ASYNC221 (vfork+exec: returns at once)
                sys.executable,
                [sys.executable, "-I", "-S", LAUNCHER],
                {},
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, memfd, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                    (os.POSIX_SPAWN_DUP2, st_w, 3),
                ],
                setsid=True,
                setsigmask=(),
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM),
            )
        except OSError as err:
            raise SpawnError(f"cannot start the job launcher: {err.strerror}") from err
        pidfd = os.pidfd_open(pid)
        for fd in (memfd, out_w, err_w, st_w):
            os.close(fd)
        memfd = out_w = err_w = st_w = -1
        report = await _read_to_eof(st_r)
        if report:
            _kill_and_reap(pid, pidfd)
            pid = -1
            step, _errno, error, what = (report.decode(errors="replace").split("\0") + [""] * 4)[:4]
            template = _STEP_MESSAGES.get(step, "job launcher failed: {error} {what}")
            message = template.format(error=error, what=what)
            raise SpawnError(message)
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        spawned = Spawned(pid=pid, pidfd=pidfd, stdout=out_r, stderr=err_r)
        pid = pidfd = out_r = err_r = -1  # ownership passes to the caller
        return spawned
    finally:
        if pid > 0:  # cancelled or failed after the launcher started: leave nothing behind
            _kill_and_reap(pid, pidfd)
        for fd in (memfd, out_r, out_w, err_r, err_w, st_r, st_w, pidfd):
            if fd >= 0:
                os.close(fd)

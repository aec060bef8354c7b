"""Starting a job's process without forking the server.

The server never forks (grpcio's threads make ``fork`` and ``preexec_fn`` unsafe,
grpc/grpc#37259). Two ways in, both ending in
:func:`jobworker.backends.local._launcher_main.launch`, which joins the job's containment
and ``execve``s the command:

* the **zygote**: a single-threaded helper process, ``posix_spawn``ed once, that copies
  itself per job with ``clone(CLONE_PARENT)`` so the job is still the server's child
  (about 2 ms a start);
* the **launcher**: ``posix_spawn`` of ``python -I -S _launcher.py`` per job (about 20 ms:
  the interpreter's start-up), used when the zygote is unavailable.

See docs/spawning.md for the reasoning and the measured costs.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import platform
import signal
import socket
import struct
import sys
from pathlib import Path

import attrs
import structlog

from jobworker.backends.local.isolation import DEFAULT_WORKDIR, IsolationPlan
from jobworker.errors import EXEC_FAILED, SpawnError
from jobworker.jobspec import JobSpec

log = structlog.get_logger("jobworker.backends.local.spawn")

LAUNCHER = str(Path(__file__).with_name("_launcher.py"))
#: Bigger pipes let a chatty job run ahead of the reader between event-loop turns.
PIPE_SIZE = 1 << 20
_ZYGOTE_MACHINES = ("x86_64", "aarch64")  # where the zygote knows clone's syscall number
_STEP_MESSAGES = {
    "exec": EXEC_FAILED + " {what!r}: {error}",
    "cwd": "cannot use working directory {what!r}: {error}",
    "join": "cannot join the job's containment {what!r}: {error}",
    "namespace": "cannot create the job's namespaces ({what}): {error}",
    "mount": "cannot set up the job's filesystem view at {what!r}: {error}",
    "network": "cannot set up the job's network namespace ({what}): {error}",
    "user": "cannot switch the job to uid {what}: {error}",
    "capabilities": "cannot drop the job's capabilities ({what}): {error}",
    "no_new_privs": "cannot set no_new_privs: {error}",
    "rlimit": "cannot limit the job's uid to {what} processes: {error}",
    "keyring": "cannot give the job keyrings of its own ({what}): {error}",
}
_SIGNALS_TO_DEFAULT = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM)


@attrs.frozen
class Spawned:
    """A running job process; the caller owns every descriptor."""

    pid: int
    pidfd: int  # readable once the process has exited
    stdout: int  # non-blocking read ends
    stderr: int
    #: A file an isolated (or monitored) job's first process writes the command's wait
    #: status to; see :func:`read_exit_report`.
    exit_report: int
    #: Non-blocking write end of the job's stdin pipe; -1 when stdin is /dev/null.
    stdin: int = -1
    #: How many levels at the top of the job's process tree are jobworker's own, which
    #: usage leaves out: 1 for an isolated job's PID 1 (the job's pid); 2 when the launcher
    #: rather than the zygote started it: the relay (the job's pid), then PID 1 and, for a
    #: private network, ``pasta`` beside it. 0: the job's pid is the user's command.
    helpers: int = 0

    def abandon(self) -> None:
        """Kill and reap the process, close every descriptor: a start that failed after
        the command ran leaves nothing."""
        _kill_and_reap(self.pid)
        for fd in (self.pidfd, self.stdout, self.stderr, self.exit_report, self.stdin):
            if fd >= 0:
                os.close(fd)


def read_exit_report(fd: int) -> int | None:
    """The command's raw wait status from the job's first process, or None (neither
    isolated nor monitored, or that process was killed before it could report)."""
    data = os.pread(fd, 32, 0)
    return int(data) if data.strip().isdigit() else None


def _exit_report_file(path: Path | None) -> int:
    """Where the job's first process reports: ``path`` (live restore: a later server reads
    it), else a file in memory."""
    if path is None:
        fd = os.memfd_create("jobworker-exit", os.MFD_CLOEXEC)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    return _above_stdio(fd)


def resolve_future(fut: asyncio.Future[None]) -> None:
    """Reader callback: wake whoever awaits ``fut``."""
    if not fut.done():
        fut.set_result(None)


def _above_stdio(fd: int) -> int:
    """Move ``fd`` above 0-3 so a child's dup2 plan cannot clobber it."""
    if fd > 3:
        return fd
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 4)
    os.close(fd)
    return high


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    return _above_stdio(r), _above_stdio(w)


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


def _kill_and_reap(pid: int) -> None:
    """Our child, not yet reaped: its pid cannot have been reused."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)  # dies at once: no real wait


def _instructions(
    spec: JobSpec, join_path: str | None, plan: IsolationPlan | None, monitor: bool
) -> bytes:
    env = spec.job_env()
    cwd = spec.cwd or ""
    plan_fields = ["monitor=1"] if monitor else []
    if plan is not None:
        plan_fields = plan.launcher_fields(os.getuid(), os.getgid())
        account = plan.account
        env.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
        cwd = cwd or DEFAULT_WORKDIR
    fields = [spec.command, cwd, join_path or "", str(len(plan_fields)), *plan_fields]
    fields += [str(len(spec.args)), *spec.args]
    fields += [f"{k}={v}" for k, v in env.items()]
    return "\0".join(fields).encode("utf-8", "surrogateescape")


def _posix_spawn_launcher(args: list[str], fd_plan: list[int], setsid: bool) -> int:
    """posix_spawn ``python -I -S _launcher.py ARGS`` with fd ``i`` = ``fd_plan[i]``."""
    return _posix_spawn([sys.executable, "-I", "-S", LAUNCHER, *args], fd_plan, setsid)


def _posix_spawn(argv: list[str], fd_plan: list[int], setsid: bool) -> int:
    """posix_spawn ``argv`` with fd ``i`` = ``fd_plan[i]``, an empty environment, an empty
    signal mask and default dispositions."""
    return os.posix_spawn(
        argv[0],
        argv,
        {},
        file_actions=[(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fd_plan)],
        setsid=setsid,
        setsigmask=(),
        setsigdef=_SIGNALS_TO_DEFAULT,
    )


def spawn_helper(argv: list[str], channel: int) -> int:
    """``posix_spawn`` a helper process of the server's (``argv``; the server never forks),
    in a session of its own (Ctrl-C on the server's terminal is the server's to handle),
    with ``channel`` as its fd 3, /dev/null as stdin and stdout, and the server's stderr.
    Returns its pid; the caller reaps it."""
    devnull = _above_stdio(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
    channel = _above_stdio(os.dup(channel))
    try:
        stderr = 2 if _fd_open(2) else devnull
        return _posix_spawn(argv, [devnull, devnull, stderr, channel], setsid=True)
    finally:
        os.close(channel)
        os.close(devnull)


class _Zygote:
    """The helper process and the request/reply exchange with it."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        devnull = _above_stdio(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
        theirs_fd = _above_stdio(theirs.detach())
        try:
            # fd 3 to 5 taken too, so descriptors it receives never land on 0-5.
            stderr = 2 if _fd_open(2) else devnull
            self.pid = _posix_spawn_launcher(
                ["--zygote"], [theirs_fd, devnull, stderr, devnull, devnull, devnull], setsid=True
            )
        finally:
            os.close(theirs_fd)
            os.close(devnull)
        ours.setblocking(False)
        self._sock = ours
        self._lock = asyncio.Lock()

    async def start(self, payload: bytes, fds: tuple[int, ...]) -> int:
        """Ask for one job process; its pid. Cancellation-safe: a late pid is killed."""
        exchange = asyncio.ensure_future(self._exchange(payload, fds))
        try:
            return await asyncio.shield(exchange)
        except asyncio.CancelledError:
            exchange.add_done_callback(_reap_abandoned)
            raise

    async def _exchange(self, payload: bytes, fds: tuple[int, ...]) -> int:
        loop = asyncio.get_running_loop()
        async with self._lock:
            header = struct.pack(">I", len(payload))
            while True:
                try:
                    socket.send_fds(self._sock, [header], list(fds))
                    break
                except BlockingIOError:
                    await _wait_writable(self._sock.fileno())
            await loop.sock_sendall(self._sock, payload)
            reply = b""
            while len(reply) < 8:
                part = await loop.sock_recv(self._sock, 8 - len(reply))
                if not part:
                    raise ConnectionError("the spawn helper exited")
                reply += part
        (pid,) = struct.unpack(">q", reply)
        if pid < 0:
            raise SpawnError(f"cannot start the job: {os.strerror(-pid)}")
        return int(pid)

    def close(self) -> None:
        """EOF ends the helper; reap it (it exits at once)."""
        self._sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def _wait_writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, resolve_future, fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


def _reap_abandoned(exchange: asyncio.Future[int]) -> None:
    if not exchange.cancelled() and exchange.exception() is None:
        _kill_and_reap(exchange.result())


class Spawner:
    """Starts job processes: through the zygote when it works, else the launcher."""

    def __init__(self, use_zygote: bool = True) -> None:
        self._use_zygote = use_zygote and platform.machine() in _ZYGOTE_MACHINES
        self._zygote: _Zygote | None = None

    def close(self) -> None:
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None

    async def _start(self, payload: bytes, child_fds: tuple[int, ...]) -> tuple[int, bool]:
        """Start a launcher whose fd 1-5 are ``child_fds``; its pid, and whether the zygote
        started it."""
        if self._use_zygote:
            try:
                if self._zygote is None:
                    self._zygote = _Zygote()
                return await self._zygote.start(payload, child_fds), True
            except (OSError, ConnectionError) as err:
                log.warning("spawn_helper_failed", error=str(err), fallback="launcher")
                self.close()  # a fresh helper is started for the next job
        memfd = _above_stdio(os.memfd_create("jobworker-launch", os.MFD_CLOEXEC))
        try:
            os.write(memfd, payload)
            os.lseek(memfd, 0, os.SEEK_SET)
            return _posix_spawn_launcher([], [memfd, *child_fds], setsid=True), False
        finally:
            os.close(memfd)

    async def spawn(
        self,
        spec: JobSpec,
        join_path: str | None,
        plan: IsolationPlan | None = None,
        exit_report: Path | None = None,
    ) -> Spawned:
        """Start ``spec``, isolated as ``plan`` says; return once the command is running.

        ``exit_report``: a file for the command's wait status that outlives the server
        (live restore); the job then always has a first process to write it.
        Raises SpawnError with the OS reason when the command cannot be executed; nothing
        is left behind then (the process is reaped, every descriptor closed).
        """
        payload = _instructions(spec, join_path, plan, monitor=exit_report is not None)
        out_r = out_w = err_r = err_w = st_r = st_w = ex_r = ex_w = in_r = in_w = -1
        pid = pidfd = -1
        try:
            out_r, out_w = _pipe()
            err_r, err_w = _pipe()
            st_r, st_w = _pipe()
            ex_r = _exit_report_file(exit_report)
            ex_w = _above_stdio(os.dup(ex_r))
            if spec.stdin:
                in_r, in_w = _pipe()
            else:
                in_r = _above_stdio(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            for w in (out_w, err_w, in_w):
                try:
                    if w >= 0:
                        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                except OSError:
                    pass  # over /proc/sys/fs/pipe-max-size when unprivileged: keep default
            try:
                pid, by_zygote = await self._start(payload, (out_w, err_w, st_w, ex_w, in_r))
            except OSError as err:
                raise SpawnError(f"cannot start the job: {err.strerror}") from err
            for fd in (out_w, err_w, st_w, ex_w, in_r):
                os.close(fd)
            out_w = err_w = st_w = ex_w = in_r = -1
            pidfd = os.pidfd_open(pid)
            report = await _read_to_eof(st_r)
            if report:
                _kill_and_reap(pid)
                pid = -1
                fields = [*report.decode(errors="replace").split("\0"), "", "", "", ""]
                step, _errno, error, what = fields[:4]
                template = _STEP_MESSAGES.get(step, "job launcher failed: {error} {what}")
                raise SpawnError(template.format(error=error, what=what))
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.set_blocking(fd, False)
            spawned = Spawned(
                pid=pid,
                pidfd=pidfd,
                stdout=out_r,
                stderr=err_r,
                exit_report=ex_r,
                stdin=in_w,
                helpers=0 if plan is None else 1 if by_zygote and not plan.relayed else 2,
            )
            pid = pidfd = out_r = err_r = ex_r = in_w = -1  # ownership passes to the caller
            return spawned
        finally:
            if pid > 0:  # cancelled or failed after the process started: leave nothing
                _kill_and_reap(pid)
            for fd in (out_r, out_w, err_r, err_w, st_r, st_w, ex_r, ex_w, in_r, in_w, pidfd):
                if fd >= 0:
                    os.close(fd)

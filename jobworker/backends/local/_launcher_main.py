"""The launcher's two ways in, one job per start or the zygote, both ending in
:func:`launch`, which becomes the job (the steps are in ``_launcher.py``'s docstring)."""

import _signal  # type: ignore[import-not-found]
import os
import sys

from ._launcher_base import EXIT_FD, STATUS_FD, STDIN_FD, fail, plan_value, plan_values, read_all
from ._launcher_isolate import CLONE_NEWCGROUP, CLONE_NEWPID, isolate
from ._launcher_pid1 import monitor


def launch(fields: list[str], pid1: bool = False) -> None:
    """Become the job: fd 1, 2, 3 and 4 are in place; never returns.

    ``pid1``: this process was cloned into the plan's namespaces (the zygote's way), so it
    is already PID 1 of the job's PID namespace.
    """
    # command, cwd, join, plan count, plan..., argument count, arguments..., NAME=value...
    command, cwd, join_path, nplan = fields[0], fields[1], fields[2], int(fields[3])
    plan = fields[4 : 4 + nplan]
    rest = fields[4 + nplan :]
    nargs = int(rest[0])
    args = rest[1 : 1 + nargs]
    env = dict(item.split("=", 1) for item in rest[1 + nargs :])
    os.dup2(STDIN_FD, 0)
    os.close(STDIN_FD)
    # Default dispositions now, not just before exec: an isolated job's PID 1 is this
    # process, and Python's own SIGINT handler must not turn a Ctrl-C into a traceback.
    for signum in (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT, _signal.SIGTERM):
        _signal.signal(signum, _signal.SIG_DFL)
    if join_path:
        try:
            with open(join_path, "w") as f:
                f.write("0")
        except OSError as err:
            fail("join", err, join_path)
    if plan_value(plan, "ns"):
        isolate(plan, pid1, bool(join_path))
    elif plan_value(plan, "monitor"):
        monitor()
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as err:
            fail("cwd", err, cwd)
    os.set_inheritable(STATUS_FD, False)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > STATUS_FD:
            try:
                os.close(fd)
            except OSError:
                pass  # the descriptor listdir itself used
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
    argv = [*plan_values(plan, "wrap"), command, *args]
    _exec(argv, env)


def _exec(argv: list[str], env: dict[str, str]) -> None:
    """``execvpe`` without its lazy imports: an isolated job may no longer see the stdlib."""
    program = argv[0]
    if "/" in program:
        candidates = [program]
    else:
        candidates = [d.rstrip("/") + "/" + program for d in env.get("PATH", "").split(":") if d]
    error: OSError = FileNotFoundError(2, "No such file or directory")
    for candidate in candidates:
        try:
            os.execve(candidate, argv, env)
        except (FileNotFoundError, NotADirectoryError):
            continue  # the next PATH entry, as a shell does
        except OSError as err:
            error = err  # remembered (EACCES...), but a later entry may still work
    fail("exec", error, program)


def zygote() -> None:
    """``--zygote``: start jobs on request, each as a child of the *server*.

    The server sends, over the socket on fd 0, a 4-byte length with the job's stdout,
    stderr, status and exit-report pipes and its stdin attached (SCM_RIGHTS), then the
    instructions. This process is single-threaded, so copying it is safe;
    ``clone(CLONE_PARENT)`` makes the copy the server's child, so the server waits for it
    exactly as for a posix_spawned launcher. An isolated job's namespaces are created by
    that same ``clone``, which makes the copy PID 1 of the job's PID namespace at once. The
    reply is the new pid (or minus errno). EOF on the socket ends the zygote.
    """
    import ctypes  # one-time costs: the zygote starts once per server
    import socket
    import struct

    clone_nr = {"x86_64": 56, "aarch64": 220}[os.uname().machine]
    clone_parent, sigchld = 0x00008000, 17
    libc = ctypes.CDLL(None, use_errno=True)
    sock = socket.socket(fileno=0)
    while True:
        header, fds, _flags, _addr = socket.recv_fds(sock, 4, 5, socket.MSG_WAITALL)
        if len(header) < 4:
            return
        (length,) = struct.unpack(">I", header)
        fields = decode(sock.recv(length, socket.MSG_WAITALL))
        nplan = int(fields[3])
        plan = fields[4 : 4 + nplan]
        flags = int(plan_value(plan, "ns", "0")) & ~CLONE_NEWCGROUP
        if plan_value(plan, "pasta"):
            flags = 0  # the launcher's way: its network helper must start outside them
        pid = libc.syscall(clone_nr, clone_parent | sigchld | flags, 0, 0, 0, 0)
        if pid == 0:
            os.setsid()
            for target, fd in zip((1, 2, STATUS_FD, EXIT_FD, STDIN_FD), fds, strict=True):
                os.dup2(fd, target)
            launch(fields, pid1=bool(flags & CLONE_NEWPID))
        for fd in fds:
            os.close(fd)
        sock.sendall(struct.pack(">q", pid if pid > 0 else -ctypes.get_errno()))


def decode(payload: bytes) -> list[str]:
    return payload.decode("utf-8", "surrogateescape").split("\0")


def main() -> None:
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        launch(decode(read_all(0)))

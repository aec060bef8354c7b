"""The job launcher: the first program of every job, run as ``python -I -S _launcher.py``.

The server never forks itself (grpcio's threads make fork unsafe); it ``posix_spawn``s this
script, which runs alone in a fresh session and, in this order:

1. reads its instructions from fd 0, then points fd 0 at /dev/null;
2. joins the job's containment (writes ``0`` to the cgroup's ``cgroup.procs``), so the
   user's command is contained from its first instruction;
3. changes directory, closes every descriptor but 0, 1, 2 and the status pipe, and gives
   signals their default disposition and an empty mask (Python ignores SIGPIPE, and ignored
   signals survive ``execve``);
4. ``execve``s the command. The status pipe (fd 3) is close-on-exec: the server reads EOF
   when the exec succeeded, or one error report when a step failed.

Instructions and reports are NUL-separated fields (no job string may hold a NUL): importing
``json`` or ``signal`` would pull in ``re`` and ``enum`` and triple the start-up time. Only
built-in modules, and no ``site``: it must start in milliseconds.
"""

import _signal  # type: ignore[import-not-found]
import os
import sys

STATUS_FD = 3


def _fail(step: str, err: OSError, what: str) -> None:
    report = "\0".join((step, str(err.errno), err.strerror or str(err), what))
    os.write(STATUS_FD, report.encode("utf-8", "surrogateescape"))
    os._exit(127)


def _read_all(fd: int) -> bytes:
    parts: list[bytes] = []
    while True:
        part = os.read(fd, 1 << 20)
        if not part:
            return b"".join(parts)
        parts.append(part)


def launch(fields: list[str]) -> None:
    """Become the job: fd 1, 2 and 3 are in place; never returns."""
    # command, cwd, join, argument count, arguments..., NAME=value...
    command, cwd, join_path, nargs = fields[0], fields[1], fields[2], int(fields[3])
    args = fields[4 : 4 + nargs]
    env = dict(item.split("=", 1) for item in fields[4 + nargs :])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if join_path:
        try:
            with open(join_path, "w") as f:
                f.write("0")
        except OSError as err:
            _fail("join", err, join_path)
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as err:
            _fail("cwd", err, cwd)
    os.set_inheritable(STATUS_FD, False)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > STATUS_FD:
            try:
                os.close(fd)
            except OSError:
                pass  # the descriptor listdir itself used
    for signum in (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT, _signal.SIGTERM):
        _signal.signal(signum, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
    try:
        os.execvpe(command, [command, *args], env)
    except OSError as err:
        _fail("exec", err, command)


def _decode(payload: bytes) -> list[str]:
    return payload.decode("utf-8", "surrogateescape").split("\0")


def zygote() -> None:
    """``--zygote``: start jobs on request, each as a child of the *server*.

    The server sends, over the socket on fd 0, a 4-byte length with the job's stdout,
    stderr and status pipes attached (SCM_RIGHTS), then the instructions. This process is
    single-threaded, so copying it is safe; ``clone(CLONE_PARENT)`` makes the copy the
    server's child, so the server waits for it exactly as for a posix_spawned launcher.
    The reply is the new pid (or minus errno). EOF on the socket ends the zygote.
    """
    import ctypes  # one-time costs: the zygote starts once per server
    import socket
    import struct

    clone_nr = {"x86_64": 56, "aarch64": 220}[os.uname().machine]
    clone_parent, sigchld = 0x00008000, 17
    libc = ctypes.CDLL(None, use_errno=True)
    sock = socket.socket(fileno=0)
    while True:
        header, fds, _flags, _addr = socket.recv_fds(sock, 4, 3, socket.MSG_WAITALL)
        if len(header) < 4:
            return
        (length,) = struct.unpack(">I", header)
        payload = sock.recv(length, socket.MSG_WAITALL)
        pid = libc.syscall(clone_nr, clone_parent | sigchld, 0, 0, 0, 0)
        if pid == 0:
            os.setsid()
            for target, fd in zip((1, 2, STATUS_FD), fds, strict=True):
                os.dup2(fd, target)
            launch(_decode(payload))
        for fd in fds:
            os.close(fd)
        sock.sendall(struct.pack(">q", pid if pid > 0 else -ctypes.get_errno()))


def main() -> None:
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        launch(_decode(_read_all(0)))


if __name__ == "__main__":
    main()

"""What every part of the launcher shares: its descriptors, how it reads its instructions
and reports a failed step, and the system calls Python has no wrapper for.

Loaded by ``_launcher.py`` before anything else, like its siblings (see there why they are
loaded by path); it imports only ``os`` and, when a plan needs it, ``ctypes``.
"""

import os

STATUS_FD = 3  # close-on-exec: EOF when the exec succeeded, else one failure report
EXIT_FD = 4  # the exit report: a first process that stays writes the command's wait status
STDIN_FD = 5  # the job's stdin until it moves to fd 0

AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and aarch64 (the unified table)
PR_SET_PDEATHSIG, PR_CAP_AMBIENT = 1, 47


def fail(step: str, err: OSError, what: str) -> None:
    report = "\0".join((step, str(err.errno), err.strerror or str(err), what))
    os.write(STATUS_FD, report.encode("utf-8", "surrogateescape"))
    os._exit(127)


def read_all(fd: int) -> bytes:
    parts: list[bytes] = []
    while True:
        part = os.read(fd, 1 << 20)
        if not part:
            return b"".join(parts)
        parts.append(part)


def plan_values(plan: list[str], key: str) -> list[str]:
    prefix = key + "="
    return [item[len(prefix) :] for item in plan if item.startswith(prefix)]


def plan_value(plan: list[str], key: str, default: str = "") -> str:
    values = plan_values(plan, key)
    return values[-1] if values else default


class Libc:
    """The few system calls Python 3.11 has no wrapper for, raising OSError like os does."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def check(self, result: int, step: str, what: str) -> None:
        if result < 0:
            errno = self.ctypes.get_errno()
            fail(step, OSError(errno, os.strerror(errno)), what)

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        enc = [s.encode() if s else None for s in (source, target, fstype, data)]
        self.check(self.lib.mount(enc[0], enc[1], enc[2], flags, enc[3]), "mount", target)

    def set_mount_attrs(self, target: str, set_flags: int, clear_flags: int) -> None:
        """Change flags of ``target`` and every mount below it (mount_setattr(2))."""
        attr = (self.ctypes.c_uint64 * 4)(set_flags, clear_flags, 0, 0)
        result = self.lib.syscall(
            SYS_MOUNT_SETATTR, AT_FDCWD, target.encode(), AT_RECURSIVE, attr, 32
        )
        self.check(result, "mount", target)

    def prctl(self, option: int, arg: int, step: str) -> None:
        self.check(self.lib.prctl(option, arg, 0, 0, 0), step, str(arg))

"""Waiting for a file to change, without polling: inotify through ctypes.

The kernel signals changes of cgroup files such as ``cgroup.events`` as IN_MODIFY events,
so "wait until the cgroup is empty" is one blocked read instead of a sleep loop. The
stdlib has no inotify binding; three libc calls are all that is needed.

Both waits arm the watch *before* checking the condition, so a change that lands between
the check and the wait still wakes the waiter.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import select
import struct
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

IN_MODIFY = 0x00000002
IN_IGNORED = 0x00008000  # the watch is gone: the file was removed
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, name length

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_init1.restype = ctypes.c_int
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_add_watch.restype = ctypes.c_int


def _check(result: int, what: str, path: Path | None = None) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}", None if path is None else str(path))
    return result


class FileWatch:
    """An inotify descriptor watching one file for modification."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")
        try:
            _check(
                _libc.inotify_add_watch(self._fd, os.fsencode(path), IN_MODIFY),
                "inotify_add_watch",
                path,
            )
        except BaseException:
            os.close(self._fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> bool:
        """Consume pending events; True when the watched file is gone."""
        gone = False
        while True:
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                return gone
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, name_len = _EVENT_HEADER.unpack_from(data, offset)
                gone = gone or bool(mask & IN_IGNORED)
                offset += _EVENT_HEADER.size + name_len

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def wait_until(path: Path, done: Callable[[], bool]) -> None:
    """Return once ``done()`` is true, re-checking it each time ``path`` is modified.

    Also returns when ``path`` disappears. Raises FileNotFoundError if it does not exist.
    """
    with FileWatch(path) as watch:
        if done():
            return
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if (watch.drain() or done()) and not woken.done():
                woken.set_result(None)

        loop.add_reader(watch.fileno(), on_readable)
        try:
            await woken
        finally:
            loop.remove_reader(watch.fileno())


def wait_until_blocking(path: Path, done: Callable[[], bool], timeout: float) -> bool:
    """:func:`wait_until` for code outside the event loop; False if ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    with FileWatch(path) as watch:
        poller = select.poll()
        poller.register(watch.fileno(), select.POLLIN)
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if poller.poll(remaining * 1000) and watch.drain():
                return True
        return True

"""Reading every job's pipes and spooling what they carry, in one thread of its own.

Why a thread: a spool write can block for seconds when the disk is slow (the kernel
throttles a writer past its dirty-page limit), and on the event loop that would stall every
RPC and every follower. Here it stalls only ingestion, which the job feels as a full pipe,
exactly as it would writing to a slow disk itself. ``read`` and ``pwritev`` release the
GIL, so the loop keeps sending to followers while this thread copies the next read.

Why first in line for the CPU: the thread runs at nice :data:`PRIORITY` (when the server may
raise it: root, or ``CAP_SYS_NICE``), ahead of the event loop and of the jobs. A job that
writes fast with a follower reading shares the CPU with the follower's sending; at equal
priority the pipe was drained late and the job ran 2x slower with one follower on 2 cores.
The thread's own work per byte is small (a read and a write, the GIL released in both), so
it cannot take much from anything else, and followers lose nothing: they read the spool
at their pace (docs/performance.md has the figures). Plugins' ``jobworker_output_chunk``
observers run in this thread, at this priority too.

The thread owns the descriptors it is given: it closes a pipe at end-of-file, or when
:meth:`Ingest.drop` asks, and only then tells the loop, so a descriptor is never closed
while the other side might still use its number.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("jobworker.ingest")

#: After reading, how long the thread lets output accumulate before it reads again.
BATCH_DELAY = 0.0005

#: The ingest thread's nice value (-20: the kernel's highest for normal threads).
PRIORITY = -20

#: Receives each read, in the ingest thread.
Sink = Callable[[bytes], None]


class Ingest:
    """One thread, one epoll, every running job's stdout and stderr pipes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_size: int) -> None:
        self._loop = loop
        self._read_size = read_size
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._requests: list[Callable[[], None]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="jobworker-ingest", daemon=True)
        self._thread.start()

    def add(self, fd: int, sink: Sink, on_eof: Callable[[], None]) -> None:
        """Read ``fd`` into ``sink`` until end-of-file, then close it and call ``on_eof``
        on the loop."""

        def register() -> None:
            self._selector.register(fd, selectors.EVENT_READ, (sink, on_eof))

        self._request(register)

    def drop(self, fd: int) -> asyncio.Future[None]:
        """Stop reading ``fd`` and close it (a pipe a leftover process still holds); the
        future resolves on the loop once it is closed and ``on_eof`` has run."""
        done: asyncio.Future[None] = self._loop.create_future()

        def drop() -> None:
            try:
                key = self._selector.get_key(fd)
            except KeyError:  # already at end-of-file
                self._loop.call_soon_threadsafe(_resolve, done)
                return
            self._finish(fd, key.data[1], done)

        self._request(drop)
        return done

    def close(self) -> None:
        """Stop the thread (every job has ended: nothing is registered any more)."""
        self._request(lambda: None, stop=True)
        self._thread.join()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _request(self, request: Callable[[], None], stop: bool = False) -> None:
        with self._lock:
            self._requests.append(request)
            self._stopping |= stop
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # already awake with many requests queued
            pass

    def _finish(
        self, fd: int, on_eof: Callable[[], None], done: asyncio.Future[None] | None
    ) -> None:
        self._selector.unregister(fd)
        os.close(fd)
        self._loop.call_soon_threadsafe(_eof, on_eof, done)

    @property
    def native_id(self) -> int | None:
        """The thread's id in the kernel (its /proc/self/task entry)."""
        return self._thread.native_id

    def _run(self) -> None:
        _raise_priority()
        read_any = False
        while True:
            if read_any:
                # Let chatty jobs fill their pipes a moment: one 1 MiB read instead of
                # hundreds of 4 KiB ones, each a spool write and a wake-up of the loop.
                time.sleep(BATCH_DELAY)
                read_any = False
            for key, _ in self._selector.select():
                if key.fd == self._wake_r:
                    if self._serve_requests():
                        return
                    continue
                sink, on_eof = key.data
                try:
                    data = os.read(key.fd, self._read_size)
                except BlockingIOError:
                    continue
                except OSError as err:
                    log.warning("job_output_read_failed", error=str(err))
                    data = b""
                if not data:
                    self._finish(key.fd, on_eof, None)
                    continue
                read_any = True
                try:
                    sink(data)
                except Exception:  # a bug: keep ingesting every other job
                    log.exception("job_output_sink_failed")

    def _serve_requests(self) -> bool:
        while True:
            try:
                if not os.read(self._wake_r, 4096):
                    break
            except BlockingIOError:
                break
        with self._lock:
            requests, self._requests = self._requests, []
            stopping = self._stopping
        for request in requests:
            request()
        return stopping


def _raise_priority() -> None:
    """This thread to :data:`PRIORITY`; where not permitted, a log line and no change."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PRIORITY)
    except PermissionError:
        log.info(
            "ingest_priority_unchanged",
            reason="raising a thread's priority needs root or CAP_SYS_NICE",
            hint="followers may slow fast-writing jobs (docs/performance.md)",
        )


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _eof(on_eof: Callable[[], None], done: asyncio.Future[None] | None) -> None:
    on_eof()
    if done is not None:
        _resolve(done)

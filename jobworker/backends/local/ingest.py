"""Reading every job's pipes and spooling what they carry, in two threads of their own.

Why threads: a spool write can block for seconds when the disk is slow (the kernel
throttles a writer past its dirty-page limit), and on the event loop that would stall every
RPC and every follower. Here it stalls only ingestion, which the job feels as a full pipe,
exactly as it would writing to a slow disk itself. ``read`` and ``pwritev`` release the
GIL, so the loop keeps sending to followers meanwhile.

Why two: the *reader* waits on every pipe and reads; the *writer* hands each read to its
sink (the spool write). A job's end is noticed by the reader, so it never waits behind
another job's throttled spool write: a job whose reads are all written is finished at once
(stopping a job on a server whose disk is throttled took 0.6 s before). The writer takes
reads in the order they were read, so the spool keeps the order between a job's stdout
and stderr that one thread gave. Memory is bounded twice: a pipe with
:data:`PENDING_PER_PIPE` reads' worth waiting is not read again until the writer catches up
(the job waits on its full pipe, as before), and past :data:`PENDING_MAX` bytes waiting in
all no pipe with data is read; a pipe at its end is still noticed, since that needs no read
of data.

Why first in line for the CPU when they run in the server: there both threads run at nice
:data:`PRIORITY` (when the server may raise it: root, or ``CAP_SYS_NICE``), ahead of the
event loop and of the jobs. A job that writes fast with a follower reading shares the CPU
with the follower's sending; at equal priority the pipe was drained late and the job ran
2x slower with one follower on 2 cores. In the ingest process (:mod:`jobworker.
ingest_process`) they keep the process's priority: with a GIL of their own they no longer
wait for the loop, and there nice -20 starved the server on a slow machine.

The threads own the descriptors they are given: a pipe is closed at end-of-file, or when
:meth:`Ingest.drop` asks, once all that was read from it is written, and only then is the
loop told, so a descriptor is never closed while the other side might still use its number.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import selectors
import termios
import threading
import time
from collections.abc import Callable

import attrs
import structlog

log = structlog.get_logger("jobworker.backends.local.ingest")

#: After reading, how long the reader lets output accumulate before it reads again.
BATCH_DELAY = 0.0005

#: The ingest threads' nice value (-20: the kernel's highest for normal threads).
PRIORITY = -20

#: Reads of one pipe that may wait for the writer before the pipe is no longer read.
PENDING_PER_PIPE = 2
#: Bytes read from all pipes and not yet written, past which no pipe with data is read.
PENDING_MAX = 64 << 20

#: Receives each read, in the writer thread.
Sink = Callable[[bytes], None]


@attrs.define(eq=False)
class Pipe:
    """One pipe being ingested: the handle :meth:`Ingest.add` returns, for :meth:`Ingest.drop`
    (a descriptor's number may be reused once closed; the handle is not). ``pending``,
    ``ended`` and ``closed`` change under ``Ingest._lock``."""

    fd: int
    sink: Sink
    on_eof: Callable[[], None]
    #: Bytes read and not yet written.
    pending: int = 0
    #: End-of-file seen, or dropped: the pipe is closed once nothing of it is pending.
    ended: bool = False
    #: Closed (or about to be, by the thread that saw its last byte written).
    closed: bool = False
    #: Dropped to be handed on (live restore): left open, for the new reader.
    keep: bool = False
    done: asyncio.Future[None] | None = None


class Ingest:
    """Two threads, one epoll, every running job's stdout and stderr pipes."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, read_size: int, priority: int | None = PRIORITY
    ) -> None:
        """``priority``: the threads' nice value (None: the process's own)."""
        self._loop = loop
        self._priority = priority
        self._read_size = read_size
        self._per_pipe = PENDING_PER_PIPE * read_size
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._requests: list[Callable[[], None]] = []
        self._stopping = False
        self._closed = False  # close() was called: drops have nothing left to do
        # The writer's queue, in read order; its condition shares the lock.
        self._queue: collections.deque[tuple[Pipe, bytes]] = collections.deque()
        self._queued = 0
        self._queue_ready = threading.Condition(self._lock)
        #: Pipes out of the selector while too much of them waits for the writer. Changed by
        #: the reader under the lock; the writer asks for a resume only when it is not empty.
        self._paused: set[Pipe] = set()
        self._resume_asked = False
        self._reader = threading.Thread(target=self._read, name="jobworker-ingest", daemon=True)
        self._writer = threading.Thread(target=self._write, name="jobworker-spool", daemon=True)
        self._reader.start()
        self._writer.start()

    @property
    def native_ids(self) -> tuple[int | None, int | None]:
        """The reader's and the writer's ids in the kernel (their /proc/self/task entries)."""
        return self._reader.native_id, self._writer.native_id

    @property
    def pending_bytes(self) -> int:
        """Bytes read from pipes and not yet written."""
        with self._lock:
            return self._queued

    def add(self, fd: int, sink: Sink, on_eof: Callable[[], None]) -> Pipe:
        """Read ``fd`` into ``sink`` until end-of-file, then close it and call ``on_eof``
        on the loop."""
        pipe = Pipe(fd, sink, on_eof)

        def register() -> None:
            self._selector.register(fd, selectors.EVENT_READ, pipe)

        self._request(register)
        return pipe

    def drop(self, pipe: Pipe, keep: bool = False) -> asyncio.Future[None]:
        """Stop reading ``pipe`` and close it (a pipe a leftover process still holds) once
        what was read from it is written, what it holds when the drop is served included;
        the future resolves on the loop once it is closed and ``on_eof`` has run.

        ``keep``: leave the descriptor open, for another reader to go on where this one
        stopped; ``pipe.keep`` then says whether it was (not if its end came first: then
        it was read whole, and closed)."""
        done: asyncio.Future[None] = self._loop.create_future()
        if self._closed:  # close() ended every pipe
            done.set_result(None)
            return done

        def drop() -> None:
            with self._lock:
                ended, closed = pipe.ended, pipe.closed
                if ended and not closed:
                    pipe.done = done  # the writer resolves it with the pipe's last write
            if ended:
                if closed:
                    self._loop.call_soon_threadsafe(_resolve, done)
                return
            pipe.done = done
            pipe.keep = keep
            if not keep and self._drain(pipe):
                return  # its end came with what it held
            self._end(pipe)

        self._request(drop)
        return done

    def close(self) -> None:
        """Stop both threads. Pipes still read (a shutdown that gave up on a job) are
        ended and closed here, what was read of them written first; a later
        :meth:`drop` has nothing left to do."""
        self._closed = True
        self._request(lambda: None, stop=True)
        self._reader.join()
        # The reader is gone: this thread may use the selector now.
        left = [key.data for key in self._selector.get_map().values() if key.fd != self._wake_r]
        for pipe in left + list(self._paused):
            self._end(pipe)
        with self._lock:
            self._queue_ready.notify()
        self._writer.join()
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

    # -- the reader ------------------------------------------------------------------------

    def _read(self) -> None:
        _raise_priority(self._priority)
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
                pipe: Pipe = key.data
                if pipe.ended:
                    # Dropped by a request served earlier in this same batch of events:
                    # unregistered (perhaps closed, its number reused) since select().
                    continue
                with self._lock:
                    # Its end, when it comes, is seen once resumed.
                    pause = self._queued >= PENDING_MAX and _available(pipe.fd) > 0
                    if pause:
                        self._paused.add(pipe)
                if pause:
                    self._selector.unregister(pipe.fd)
                    continue
                read = self._read_once(pipe, pause=True)
                read_any |= read
                if read and pipe in self._paused:  # only this thread adds to the set
                    self._selector.unregister(pipe.fd)

    def _read_once(self, pipe: Pipe, pause: bool = False) -> bool:
        """One read of ``pipe``, queued for the writer; at its end (or a failed read) the
        pipe is ended. True if data was read. ``pause``: mark the pipe paused when enough
        of it waits for the writer (the caller takes it out of the selector)."""
        try:
            data = os.read(pipe.fd, self._read_size)
        except BlockingIOError:
            return False
        except OSError as err:
            log.warning("job_output_read_failed", error=str(err))
            data = b""
        if not data:
            self._end(pipe)
            return False
        with self._lock:
            pipe.pending += len(data)
            self._queued += len(data)
            self._queue.append((pipe, data))
            self._queue_ready.notify()
            # Marked paused in the same step as the read is queued: the writer then
            # always sees it, and asks for a resume after writing it.
            if pause and pipe.pending >= self._per_pipe:
                self._paused.add(pipe)
        return True

    def _drain(self, pipe: Pipe) -> bool:
        """Take what a dropped pipe already holds: output the job wrote before it ended,
        which a reader that fell behind (a loaded machine, a helper that was stopped) has
        not read yet. Bounded: one read takes what a pipe holds (``read_size`` is the
        pipes' size), a second sees its end; a leftover process that writes on is not
        followed. True if the pipe's end was seen (it is ended)."""
        for _ in range(2):
            if not self._read_once(pipe):
                return pipe.ended
        return False

    def _resume(self) -> None:
        """Read again the pipes the writer has caught up with."""
        with self._lock:
            self._resume_asked = False
            if self._queued >= PENDING_MAX:
                return
            ready = [p for p in self._paused if p.pending < self._per_pipe]
            self._paused.difference_update(ready)
        for pipe in ready:
            self._selector.register(pipe.fd, selectors.EVENT_READ, pipe)

    def _end(self, pipe: Pipe) -> None:
        """End-of-file (or dropped): no more reads; closed now if nothing is pending."""
        with self._lock:
            paused = pipe in self._paused
            self._paused.discard(pipe)
        if not paused:
            self._selector.unregister(pipe.fd)
        with self._lock:
            pipe.ended = True
            finish = pipe.closed = not pipe.pending
        if finish:
            self._finish(pipe)

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

    # -- the writer ------------------------------------------------------------------------

    def _write(self) -> None:
        _raise_priority(self._priority)
        while True:
            with self._lock:
                while not self._queue:
                    if self._stopping and not self._reader.is_alive():
                        return
                    self._queue_ready.wait()  # close() notifies once the reader is gone
                pipe, data = self._queue.popleft()
            try:
                pipe.sink(data)
            except Exception:  # a bug: keep ingesting every other job
                log.exception("job_output_sink_failed")
            with self._lock:
                pipe.pending -= len(data)
                self._queued -= len(data)
                finish = pipe.ended and not pipe.pending
                pipe.closed |= finish
                # Only when a pipe waits to be read again: not a wake-up of the reader per write.
                resume = bool(self._paused) and not self._resume_asked
                if resume:
                    self._resume_asked = True
            del data
            if finish:
                self._finish(pipe)
            if resume:
                self._request(self._resume)

    # -- either --------------------------------------------------------------------------

    def _finish(self, pipe: Pipe) -> None:
        """Close the pipe and tell the loop: by the reader at end-of-file with nothing
        pending, or by the writer after the pipe's last pending read."""
        if not pipe.keep:
            os.close(pipe.fd)
        self._loop.call_soon_threadsafe(_eof, pipe.on_eof, pipe.done)


def _available(fd: int) -> int:
    """Bytes waiting in a pipe (0 at its end)."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except OSError:
        return 0
    return int.from_bytes(buf, "little")


def _raise_priority(priority: int | None) -> None:
    """This thread to ``priority``; where not permitted, a log line and no change."""
    if priority is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), priority)
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

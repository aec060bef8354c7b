"""A job's output, spooled to a file and read back by any number of followers.

The file is a sequence of records ``[stream:u8][length:u32 BE][data]`` in arrival order,
written by :mod:`jobworker.backends.local.spoolwriter` (the format, the budget and the cut
are stated there). Each follower reads with ``pread`` at its own position, so a slow
follower never holds anyone else back.

A position in the file is the follower's resume cursor: every chunk carries the position
just after it, and an offset a client passes back must be such a record boundary.

Two sides: a :class:`~jobworker.backends.local.spoolwriter.SpoolWriter` appends records in
the spool-writing thread (in the ingest process, or in the server when a plugin observes
output chunks). Its :class:`~jobworker.backends.local.spoolwriter.SpoolState` reaches the
loop, where :meth:`OutputLog.publish` (in-process) or :meth:`OutputLog.adopt` (from the
ingest process) makes what was written visible to followers. :meth:`OutputLog.append`
writes and publishes at once, for callers on the loop. A follower that reaches the cut
gets :class:`DataLoss` instead of a clean end.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from jobworker.backends.local.spoolwriter import (
    CHUNK_MAX,
    HEADER,
    SpoolAccount,
    SpoolState,
    SpoolWriter,
    unlimited,
)
from jobworker.errors import DataLoss, FailedPrecondition, InvalidArgument, Unavailable
from jobworker.model import OutputChunk, Stream

#: Largest chunk handed to a follower (one gRPC message): adjacent records of one stream
#: are merged up to this, since every message costs a trip through the stack.
FOLLOW_CHUNK_MAX = 256 * 1024
#: A follower's first chunks are at most one record; see :func:`next_chunk_max`.
FOLLOW_CHUNK_MIN = CHUNK_MAX
#: A consumer that asks for the next chunk within this many seconds of receiving one is
#: keeping up, and earns chunks twice as large; a slower one gets chunks half as large.
KEEPING_UP = 0.05
#: A follower gets chunks of :data:`FOLLOW_CHUNK_MIN` until it has taken this much. Being
#: prompt proves nothing before: a grpc client buffers about 4 MiB of a stream whose
#: messages its application never reads, and sends for it look prompt until that is full.
FOLLOW_RAMP_BYTES = 8 * 1024 * 1024


def next_chunk_max(current: int, took: float, taken: int) -> int:
    """The size limit of a follower's next chunk, from how long it took over the last one
    and how many bytes it has taken in all.

    Like TCP's slow start: a follower earns large chunks (fewer trips through the stack)
    by taking small ones promptly, and loses them by being slow. What a follower that
    stops reading pins in the server is the chunk being sent (the encoded message and
    grpc's copy of it): one that never read pins two records' worth, not two 256 KiB
    messages (docs/performance.md has the figures).
    """
    if took > KEEPING_UP:
        return max(current // 2, FOLLOW_CHUNK_MIN)
    if taken < FOLLOW_RAMP_BYTES:
        return current
    return min(current * 2, FOLLOW_CHUNK_MAX)


def _read_ahead(chunk_max: int) -> int:
    """Bytes of file holding one chunk of ``chunk_max`` payload in full records."""
    return chunk_max + (chunk_max // CHUNK_MAX) * HEADER.size


def _take_chunk(stream: Stream, parts: list[memoryview], position: int) -> OutputChunk:
    """The chunk of ``parts`` (emptied): built in the ``yield`` expression, so the
    generator's frame keeps no reference to it while the consumer sends it."""
    chunk = OutputChunk(stream, b"".join(parts), position)  # the one copy out of the buffer
    parts.clear()
    return chunk


class OutputLog:
    """Append-only spool of one job's output with live followers."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int | None = None,
        budget: SpoolAccount | None = None,
        existing: bool = False,
    ) -> None:
        """``existing``: the spool of an adopted job (live restore), not a new file; its
        state comes with :meth:`adopt`."""
        self.path = path
        create = 0 if existing else os.O_CREAT | os.O_EXCL
        self._fd = os.open(path, os.O_RDWR | create | os.O_CLOEXEC, 0o600)
        self.max_bytes = max_bytes
        #: The client whose jobs' share of the spool budget this log draws on.
        self.owner = (budget or unlimited()).owner
        #: The writing side: used in the spool-writing thread, or mirroring the ingest
        #: process's writer (:meth:`adopt`).
        self.writer = SpoolWriter(self._fd, max_bytes, budget or unlimited())
        # Reader side (the event loop).
        self._size = 0
        self._payload = 0
        self._seen = 0
        self._cut: str | None = None
        self._closed = False
        self._removed = False
        self._detached = False
        # Every MARK_EVERY-th record boundary, so that checking a resume offset reads a
        # bounded number of headers, however long the log (a few KiB for 10 GiB).
        self._marks: list[int] = [0]
        # A set, so that a follower that gives up removes its own future at once: a job
        # that writes nothing for hours must not collect every cancelled follower.
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def fd(self) -> int:
        """The spool file, open for writing; -1 once the log is complete."""
        return self._fd

    @property
    def size(self) -> int:
        return self._size

    @property
    def payload_bytes(self) -> int:
        """Bytes the job wrote, kept or not."""
        return self._seen

    @property
    def kept_bytes(self) -> int:
        """Bytes of output kept in the spool (the file also holds a 5-byte header per
        record); less than :attr:`payload_bytes` once the log is cut."""
        return self._payload

    @property
    def truncated(self) -> bool:
        return self._cut is not None

    @property
    def cut_reason(self) -> str | None:
        return self._cut

    @property
    def complete(self) -> bool:
        return self._closed

    def append(self, stream: Stream, data: bytes) -> None:
        """Spool ``data`` and publish it at once (for callers on the event loop)."""
        self.write(stream, data)
        self.publish()

    def cut(self, reason: str) -> None:
        """Keep nothing more (any thread): followers get DATA_LOSS at what was kept."""
        self.writer.cut(reason)

    def write(self, stream: Stream, data: bytes) -> None:
        """Spool ``data`` (the spool-writing thread); see :meth:`SpoolWriter.write`."""
        self.writer.write(stream, data)

    def publish(self) -> None:
        """Make what was spooled visible to followers (the event loop)."""
        state = self.writer.take()
        self._size = state.size
        self._payload = state.payload
        self._seen = state.seen
        self._cut = state.cut
        self._marks += state.marks
        self._wake()

    def adopt(self, state: SpoolState) -> None:
        """Publish what the ingest process's writer spooled (the event loop)."""
        self.writer.adopt(state)
        self.publish()

    def close(self) -> None:
        """No more output: followers finish once they have read everything.

        The writer's descriptor goes too, so a retained finished job holds no descriptor;
        later followers open the file by name.
        """
        self.publish()
        self._closed = True
        self._wake()
        self._close_fd()

    def remove(self) -> None:
        """Delete the spool file. Followers still reading keep their own descriptor."""
        self._closed = True
        self._removed = True
        self._wake()
        self._close_fd()
        self.path.unlink(missing_ok=True)
        self.writer.give_back()

    def detach(self) -> None:
        """The server stops and leaves the job to the next one (live restore): followers
        get UNAVAILABLE once they have read what is published, and resume from their
        offset on the next server."""
        self._detached = True
        self._wake()
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait_beyond(self, position: int) -> None:
        while self._size <= position and not (self._closed or self._detached):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(fut)
            try:
                await fut
            finally:
                self._waiters.discard(fut)

    def _data_loss(self) -> DataLoss:
        return DataLoss(
            f"the output was cut after {self._payload} bytes kept of {self._seen} written"
            f" so far, by {self._cut}; the rest is lost"
        )

    def _check_offset(self, fd: int, offset: int) -> None:
        """An offset must be a record boundary: walk the headers to prove it."""
        if offset == 0:
            return
        if offset > self._size:
            raise InvalidArgument(
                f"offset {offset} is beyond the {self._size} bytes of output so far;"
                " pass the offset of a chunk you received"
            )
        position = self._marks[bisect.bisect_right(self._marks, offset) - 1]
        while position < offset:
            _, length = HEADER.unpack(os.pread(fd, HEADER.size, position))
            position += HEADER.size + length
        if position != offset:
            raise InvalidArgument(
                f"offset {offset} is not a chunk boundary; pass the offset of a chunk you received"
            )

    def follow(self, offset: int = 0, follow: bool = True) -> AsyncIterator[OutputChunk]:
        """Chunks from ``offset``; with ``follow`` until the log is complete, else what exists.

        Validates ``offset`` now (raising InvalidArgument) so a caller learns of a bad cursor
        before it starts streaming.
        """
        if self._removed:
            raise InvalidArgument("the output of this job was removed")
        try:
            # Once complete the file no longer changes: a new descriptor by name will do.
            fd = os.dup(self._fd) if self._fd >= 0 else os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FailedPrecondition(
                f"the spooled output of this job is gone from {self.path.parent}"
            ) from None
        try:
            self._check_offset(fd, offset)
        except BaseException:
            os.close(fd)
            raise
        return self._follow(fd, offset, follow)

    async def _follow(self, fd: int, position: int, follow: bool) -> AsyncIterator[OutputChunk]:
        end = self._size if not follow else None
        buf = b""
        buf_at = position
        chunk_max = FOLLOW_CHUNK_MIN
        taken = 0
        try:
            while True:
                limit = self._size if end is None else end
                if position >= limit:
                    if self._cut is not None and position >= self._size:
                        raise self._data_loss()
                    if end is not None or self._closed:
                        return
                    if self._detached:
                        raise Unavailable(
                            f"the server is restarting (serve --live-restore); the job goes"
                            f" on: resume from offset {position} once it is back"
                        )
                    await self._wait_beyond(position)
                    continue
                # Refill the read-ahead buffer from the file when it does not hold a record.
                if position - buf_at + HEADER.size > len(buf):
                    buf = os.pread(fd, min(_read_ahead(chunk_max), limit - position), position)
                    buf_at = position
                chunk_stream: Stream | None = None
                parts: list[memoryview] = []
                size = 0
                while position < limit:
                    rel = position - buf_at
                    if rel + HEADER.size > len(buf):
                        break
                    tag, length = HEADER.unpack_from(buf, rel)
                    stream = Stream(tag)
                    if chunk_stream is not None and (
                        stream is not chunk_stream or size + length > chunk_max
                    ):
                        break
                    if rel + HEADER.size + length > len(buf):
                        if parts:
                            break
                        buf = os.pread(fd, HEADER.size + length, position)
                        buf_at = position
                        rel = 0
                    chunk_stream = stream
                    parts.append(memoryview(buf)[rel + HEADER.size : rel + HEADER.size + length])
                    size += length
                    position += HEADER.size + length
                if chunk_stream is not None:
                    if position - buf_at >= len(buf):
                        buf = b""  # all sent: hold nothing while the client is slow
                    sent = time.monotonic()
                    yield _take_chunk(chunk_stream, parts, position)
                    taken += size
                    chunk_max = next_chunk_max(chunk_max, time.monotonic() - sent, taken)
        finally:
            os.close(fd)

"""A job's output, spooled to a file and read back by any number of followers.

The file is a sequence of records ``[stream:u8][length:u32 BE][data]`` in arrival order, so
stdout and stderr keep their relative order and each stays byte-exact. Memory stays bounded
whatever the job writes: the writer appends to the page cache, and each follower reads with
``pread`` at its own position, so a slow follower never holds anyone else back.

A position in the file is the follower's resume cursor: every chunk carries the position
just after it.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

from jobworker.errors import FailedPrecondition, InvalidArgument
from jobworker.model import OutputChunk, Stream

_HEADER = struct.Struct(">BI")
#: Largest record and largest chunk handed to a follower (one gRPC message).
CHUNK_MAX = 64 * 1024
#: Largest chunk handed to a follower (one gRPC message): adjacent records of one stream
#: are merged up to this, since every message costs a trip through the stack.
FOLLOW_CHUNK_MAX = 256 * 1024
_READ_AHEAD = 4 * FOLLOW_CHUNK_MAX
_MARK_EVERY = 256


class OutputLog:
    """Append-only spool of one job's output with live followers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._size = 0
        self._payload = 0
        self._closed = False
        self._removed = False
        self._records = 0
        # Every _MARK_EVERY-th record boundary, so that checking a resume offset reads a
        # bounded number of headers, however long the log (a few KiB for 10 GiB).
        self._marks: list[int] = [0]
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def size(self) -> int:
        return self._size

    @property
    def payload_bytes(self) -> int:
        """Bytes the job wrote (the file also holds a 5-byte header per record)."""
        return self._payload

    @property
    def complete(self) -> bool:
        return self._closed

    def append(self, stream: Stream, data: bytes) -> None:
        """Spool ``data``; wakes every waiting follower. Never blocks on followers."""
        view = memoryview(data)
        # Every record of this read in one system call: the per-call cost dominates.
        parts: list[bytes | memoryview] = []
        marks: list[int] = []
        position, records = self._size, self._records
        for start in range(0, len(view), CHUNK_MAX):
            piece = view[start : start + CHUNK_MAX]
            parts += [_HEADER.pack(stream, len(piece)), piece]
            position += _HEADER.size + len(piece)
            records += 1
            if records % _MARK_EVERY == 0:
                marks.append(position)
        total = position - self._size
        written = os.pwritev(self._fd, parts, self._size)
        if written < total:  # short writes are rare on regular files, not impossible
            rest = b"".join(parts)[written:]
            while rest:
                done = os.pwrite(self._fd, rest, self._size + total - len(rest))
                rest = rest[done:]
        self._size += total
        self._records = records
        self._marks += marks
        self._payload += len(view)
        self._wake()

    def close(self) -> None:
        """No more output: followers finish once they have read everything.

        The writer's descriptor goes too, so a retained finished job holds no descriptor;
        later followers open the file by name.
        """
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

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait_beyond(self, position: int) -> None:
        while self._size <= position and not self._closed:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()

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
            _, length = _HEADER.unpack(os.pread(fd, _HEADER.size, position))
            position += _HEADER.size + length
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
        try:
            while True:
                limit = self._size if end is None else end
                if position >= limit:
                    if end is not None or self._closed:
                        return
                    await self._wait_beyond(position)
                    continue
                # Refill the read-ahead buffer from the file when it does not hold a record.
                if position - buf_at + _HEADER.size > len(buf):
                    buf = os.pread(fd, min(_READ_AHEAD, limit - position), position)
                    buf_at = position
                chunk_stream: Stream | None = None
                parts: list[bytes] = []
                size = 0
                while position < limit:
                    rel = position - buf_at
                    if rel + _HEADER.size > len(buf):
                        break
                    tag, length = _HEADER.unpack_from(buf, rel)
                    stream = Stream(tag)
                    if chunk_stream is not None and (
                        stream is not chunk_stream or size + length > FOLLOW_CHUNK_MAX
                    ):
                        break
                    if rel + _HEADER.size + length > len(buf):
                        if parts:
                            break
                        buf = os.pread(fd, _HEADER.size + length, position)
                        buf_at = position
                        rel = 0
                    chunk_stream = stream
                    parts.append(buf[rel + _HEADER.size : rel + _HEADER.size + length])
                    size += length
                    position += _HEADER.size + length
                if chunk_stream is not None:
                    yield OutputChunk(chunk_stream, b"".join(parts), position)
        finally:
            os.close(fd)

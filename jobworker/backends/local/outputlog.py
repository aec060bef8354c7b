"""A job's output, spooled to a file and read back by any number of followers.

The file is a sequence of records ``[stream:u8][length:u32 BE][data]`` in arrival order, so
stdout and stderr each stay byte-exact and keep the order in which the server read them
(see docs/api.md for what that order is worth). Memory stays bounded whatever the job
writes: the writer appends to the page cache, and each follower reads with ``pread`` at its
own position, so a slow follower never holds anyone else back.

A position in the file is the follower's resume cursor: every chunk carries the position
just after it.

Two sides: a :class:`SpoolWriter` appends records in the spool-writing thread
(:mod:`jobworker.backends.local.ingest`), so a slow disk never stalls the event loop; that thread
runs in
the ingest process (:mod:`jobworker.backends.local.ingest_process`), or in the server when a plugin
observes output chunks. The writer's :class:`SpoolState` reaches the loop, where
:meth:`OutputLog.publish` (in-process) or :meth:`OutputLog.adopt` (from the ingest
process) makes what was written visible to followers. :meth:`OutputLog.append` writes and
publishes at once, for callers on the loop.

**The cut.** Output is kept up to the job's cap and while the server-wide
:class:`SpoolBudget` allows; past that, or after a write fails (disk full), the log is
*cut*: nothing more is spooled, what the job writes is still read (so it never blocks on a
full pipe) and counted, and a follower that reaches the cut gets :class:`DataLoss` instead
of a clean end.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import struct
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs

from jobworker.errors import DataLoss, FailedPrecondition, InvalidArgument, Unavailable
from jobworker.model import OutputChunk, Stream

_HEADER = struct.Struct(">BI")
#: Largest record and largest chunk handed to a follower (one gRPC message).
CHUNK_MAX = 64 * 1024
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
_MARK_EVERY = 256


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
    return chunk_max + (chunk_max // CHUNK_MAX) * _HEADER.size


def _take_chunk(stream: Stream, parts: list[memoryview], position: int) -> OutputChunk:
    """The chunk of ``parts`` (emptied): built in the ``yield`` expression, so the
    generator's frame keeps no reference to it while the consumer sends it."""
    chunk = OutputChunk(stream, b"".join(parts), position)  # the one copy out of the buffer
    parts.clear()
    return chunk


class SpoolBudget:
    """Bytes of spool (records with their headers) all jobs of one server may hold, and
    the share of them one client's jobs may (``per_client``): one client filling its share
    never cuts another's output (docs/security.md, "Spool fairness").

    Thread-safe: ingest takes, the event loop gives back when a job's output is removed.
    Each job's log draws on its owner's :class:`SpoolAccount`.
    """

    def __init__(self, limit: int | None, per_client: int | None = None) -> None:
        self.limit = limit
        self.per_client = per_client
        self._used = 0
        self._by_client: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def used_by(self) -> dict[str, int]:
        """Bytes each client's jobs hold now."""
        with self._lock:
            return dict(self._by_client)

    def account(self, owner: str) -> SpoolAccount:
        return SpoolAccount(self, owner)

    def take(self, owner: str, wanted: int, *, force: bool = False) -> int:
        """Reserve up to ``wanted`` bytes for ``owner``'s jobs; how many were granted.
        ``force``: all of them, whatever the limits (spool already written)."""
        with self._lock:
            held = self._by_client.get(owner, 0)
            granted = wanted
            if not force and self.limit is not None:
                granted = min(granted, self.limit - self._used)
            if not force and self.per_client is not None:
                granted = min(granted, self.per_client - held)
            granted = max(0, granted)
            self._used += granted
            self._by_client[owner] = held + granted
            return granted

    def give_back(self, owner: str, amount: int) -> None:
        with self._lock:
            self._used -= amount
            left = self._by_client.get(owner, 0) - amount
            if left > 0:
                self._by_client[owner] = left
            else:
                self._by_client.pop(owner, None)

    def refusal(self, owner: str) -> str:
        """Which limit stops ``owner``'s jobs now, for the cut's reason."""
        with self._lock:
            total = None if self.limit is None else self.limit - self._used
            share = (
                None if self.per_client is None else self.per_client - self._by_client.get(owner, 0)
            )
        if share is not None and (total is None or share <= total):
            return (
                f"{owner}'s share of the server's spool, {self.per_client} bytes for all of"
                " its jobs (serve --max-spool-bytes-per-client)"
            )
        return (
            f"the server's spool budget of {self.limit} bytes for all jobs"
            " (serve --max-spool-bytes)"
        )


@attrs.frozen
class SpoolAccount:
    """One client's side of the :class:`SpoolBudget`: what its jobs' logs take and give."""

    budget: SpoolBudget
    owner: str

    @property
    def bounded(self) -> bool:
        return self.budget.limit is not None or self.budget.per_client is not None

    def take(self, wanted: int, *, force: bool = False) -> int:
        return self.budget.take(self.owner, wanted, force=force)

    def give_back(self, amount: int) -> None:
        self.budget.give_back(self.owner, amount)

    def refusal(self) -> str:
        return self.budget.refusal(self.owner)


def unlimited() -> SpoolAccount:
    """The account of a log whose owner does not matter (tests, tools): no limit."""
    return SpoolAccount(SpoolBudget(None), "")


@attrs.frozen
class SpoolState:
    """What a :class:`SpoolWriter` has spooled: handed to the event loop (in-process, or
    from the ingest process over its socket), which publishes it to followers."""

    size: int
    payload: int
    seen: int
    records: int
    #: Record boundaries added since the previous state (every :data:`_MARK_EVERY`-th).
    marks: tuple[int, ...]
    cut: str | None
    charged: int


class SpoolWriter:
    """The writing side of one job's spool: records appended at the end, the output cap and
    the server's budget applied, and the cut. Runs in one thread at a time (the spool
    writer, here or in the ingest process); :meth:`take` may be called from another."""

    def __init__(self, fd: int, max_bytes: int | None, budget: SpoolAccount) -> None:
        self._fd = fd
        self._max_bytes = max_bytes
        self._budget = budget
        self._lock = threading.Lock()
        self._size = 0
        self._payload = 0
        self._records = 0
        self._marks: list[int] = []
        self._seen = 0
        self._cut: str | None = None
        self.charged = 0  # spool bytes taken from the budget

    def cut(self, reason: str) -> None:
        """Keep nothing more (any thread): followers get DATA_LOSS at what was kept."""
        with self._lock:
            if self._cut is None:
                self._cut = reason

    def take(self) -> SpoolState:
        """The state so far; the marks it carries are not carried again."""
        with self._lock:
            marks, self._marks = self._marks, []
            return SpoolState(
                self._size,
                self._payload,
                self._seen,
                self._records,
                tuple(marks),
                self._cut,
                self.charged,
            )

    def adopt(self, state: SpoolState) -> None:
        """Mirror a writer elsewhere (the ingest process), so that this one could go on
        where it stands; its budget charge stays there."""
        with self._lock:
            self._size, self._payload, self._seen = state.size, state.payload, state.seen
            self._records = state.records
            self._marks += state.marks
            if self._cut is None:
                self._cut = state.cut

    def resume(self, state: SpoolState) -> None:
        """Go on from ``state``, what an earlier writer of this spool left (live restore);
        what it charged is taken from this writer's budget."""
        self.adopt(state)
        self.charged = self._budget.take(state.charged, force=True)

    def write(self, stream: Stream, data: bytes) -> None:
        """Spool ``data``; never blocks on followers.

        Keeps what the cap and the budget allow; a failed write cuts the log (the job goes
        on). Raises nothing: the state records why it was cut.
        """
        with self._lock:
            self._seen += len(data)
            if self._cut is not None:
                return
        kept = len(data)
        reason = None
        if self._max_bytes is not None and self._payload + kept > self._max_bytes:
            kept = max(0, self._max_bytes - self._payload)
            reason = f"the job's output cap of {self._max_bytes} bytes (serve --max-output-bytes)"
        kept = self._reserve(kept)
        if reason is None and kept < len(data):
            reason = self._budget.refusal()
        if kept:
            try:
                self._write_records(stream, memoryview(data)[:kept])
            except OSError as err:
                reason = f"writing the spool failed: {err.strerror or err}"
        if reason is not None:
            self.cut(reason)

    def _reserve(self, kept: int) -> int:
        """Shrink ``kept`` payload bytes to what the budget grants, headers included."""
        if not kept or not self._budget.bounded:
            self.charged += self._budget.take(_spool_bytes(kept))
            return kept
        wanted = _spool_bytes(kept)
        granted = self._budget.take(wanted)
        if granted < wanted:
            # Whole records only: give back what a partial header would waste.
            records = -(-granted // (CHUNK_MAX + _HEADER.size))
            kept = max(0, granted - records * _HEADER.size)
            self._budget.give_back(granted - _spool_bytes(kept))
            granted = _spool_bytes(kept)
        self.charged += granted
        return kept

    def _write_records(self, stream: Stream, view: memoryview) -> None:
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
        with self._lock:
            self._size += total
            self._records = records
            self._marks += marks
            self._payload += len(view)

    def give_back(self) -> None:
        """Return the budget this log took (its spool is deleted)."""
        self._budget.give_back(self.charged)
        self.charged = 0


def _spool_bytes(payload: int) -> int:
    return payload + _HEADER.size * -(-payload // CHUNK_MAX)


def scan(fd: int, seen: int | None, cut: str | None) -> SpoolState:
    """The state of a spool another process wrote (live restore), from its records.

    ``seen`` and ``cut`` are what the file cannot tell: bytes the job wrote past a cut, and
    why it was cut (``seen`` None: nothing past what the file holds). A record the writer
    did not finish (it was killed mid-write) is not counted: the next write replaces it.
    """
    end = os.fstat(fd).st_size
    position = payload = records = 0
    marks: list[int] = []
    while position + _HEADER.size <= end:
        _, length = _HEADER.unpack(os.pread(fd, _HEADER.size, position))
        if position + _HEADER.size + length > end:
            break
        position += _HEADER.size + length
        payload += length
        records += 1
        if records % _MARK_EVERY == 0:
            marks.append(position)
    return SpoolState(
        size=position,
        payload=payload,
        seen=max(payload, seen or 0),
        records=records,
        marks=tuple(marks),
        cut=cut,
        charged=position,
    )


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
        # Every _MARK_EVERY-th record boundary, so that checking a resume offset reads a
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
                if position - buf_at + _HEADER.size > len(buf):
                    buf = os.pread(fd, min(_read_ahead(chunk_max), limit - position), position)
                    buf_at = position
                chunk_stream: Stream | None = None
                parts: list[memoryview] = []
                size = 0
                while position < limit:
                    rel = position - buf_at
                    if rel + _HEADER.size > len(buf):
                        break
                    tag, length = _HEADER.unpack_from(buf, rel)
                    stream = Stream(tag)
                    if chunk_stream is not None and (
                        stream is not chunk_stream or size + length > chunk_max
                    ):
                        break
                    if rel + _HEADER.size + length > len(buf):
                        if parts:
                            break
                        buf = os.pread(fd, _HEADER.size + length, position)
                        buf_at = position
                        rel = 0
                    chunk_stream = stream
                    parts.append(memoryview(buf)[rel + _HEADER.size : rel + _HEADER.size + length])
                    size += length
                    position += _HEADER.size + length
                if chunk_stream is not None:
                    if position - buf_at >= len(buf):
                        buf = b""  # all sent: hold nothing while the client is slow
                    sent = time.monotonic()
                    yield _take_chunk(chunk_stream, parts, position)
                    taken += size
                    chunk_max = next_chunk_max(chunk_max, time.monotonic() - sent, taken)
        finally:
            os.close(fd)

"""Followers of one job on one front share one stream from the job's node.

Relaying costs the front about as much CPU as the node's agent spends sending (it
decrypts what it then encrypts again), so N followers of a job, each with a stream of its
own, cost the agent and the front N times. Instead the first follower of a job opens a
**shared stream** from the agent's port, and followers that come while it holds their
offset read from it: the agent sends once and the front decrypts once, whatever the
number of followers.

The rules, so that no follower holds another back and memory stays bounded:

* The shared stream keeps the chunks between its slowest and its fastest follower, and
  reads ahead of the fastest by at most ``AHEAD_BYTES``; it does not wait for the others.
* A follower more than ``BEHIND_BYTES`` behind the fastest (its client reads slowly, or
  not at all) leaves it and goes on alone from its offset (a stream of its own).
* A follower joins only at an offset the shared stream holds (its start, or the offset
  after one of its chunks); any other offset gets a stream of its own, which checks it.
* An error ends every follower once it has read what came before (a lost node, a cut
  spool); the last follower to leave closes the shared stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable

import attrs
import structlog

from jobworker.model import OutputChunk

log = structlog.get_logger("jobworker.ray.front")

#: How far the shared stream reads ahead of its fastest follower.
AHEAD_BYTES = 1 << 20
#: How far a follower may lag behind the fastest before it goes on alone.
BEHIND_BYTES = 8 << 20

#: A followed stream of one job from an offset (the front's own, with its retries).
Source = Callable[[int], AsyncIterator[OutputChunk]]


@attrs.define(eq=False)
class _Reader:
    #: Index (in the shared stream, from its start) of the next chunk to read.
    index: int


class _Shared:
    """One job's shared stream: a window of chunks fed by one source, read by followers."""

    def __init__(self, source: Source, offset: int) -> None:
        self._chunks: collections.deque[OutputChunk] = collections.deque()
        #: Index (from the stream's start) of ``_chunks[0]``, and the offset just before it.
        self._first = 0
        self._first_offset = offset
        self._readers: set[_Reader] = set()
        self._ended = False
        self._error: Exception | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._produce(source(offset)))

    @property
    def closed(self) -> bool:
        return not self._readers

    def join(self, offset: int) -> _Reader | None:
        """A reader at ``offset`` if the window holds it, else None."""
        if offset == self._first_offset:
            index = self._first
        else:
            at = next((i for i, c in enumerate(self._chunks) if c.offset == offset), None)
            if at is None:
                return None
            index = self._first + at + 1
        reader = _Reader(index)
        self._readers.add(reader)
        return reader

    def leave(self, reader: _Reader) -> None:
        self._readers.discard(reader)
        if not self._readers:
            self._task.cancel()
        self._trim()
        self._notify()

    def next_chunk(self, reader: _Reader) -> OutputChunk | None:
        """The reader's next chunk, or None until it comes; raises :class:`_FellBehind`
        if it was dropped, StopAsyncIteration at the end, and the stream's error once the
        reader has read everything before it."""
        if reader.index < self._first:
            raise _FellBehind
        if reader.index < self._first + len(self._chunks):
            chunk = self._chunks[reader.index - self._first]
            reader.index += 1
            self._trim()
            self._notify()
            return chunk
        if self._error is not None:
            raise self._error
        if self._ended:
            raise StopAsyncIteration
        return None

    async def changed(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _bytes(self, start: int, stop: int | None = None) -> int:
        """Bytes of the chunks with indexes ``start`` to ``stop`` (the end)."""
        low = max(start - self._first, 0)
        high = None if stop is None else max(stop - self._first, low)
        return sum(len(c.data) for c in itertools.islice(self._chunks, low, high))

    def _trim(self) -> None:
        """Drop what no reader needs any more, and what lags too far behind the fastest."""
        if not self._readers:
            return
        indexes = [r.index for r in self._readers]
        slowest, fastest = min(indexes), max(indexes)
        behind = self._bytes(self._first, fastest)
        while self._chunks and (self._first < slowest or behind > BEHIND_BYTES):
            dropped = self._chunks.popleft()
            if self._first < fastest:
                behind -= len(dropped.data)
            self._first += 1
            self._first_offset = dropped.offset

    async def _produce(self, chunks: AsyncIterator[OutputChunk]) -> None:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            try:
                async for chunk in chunks:
                    self._chunks.append(chunk)
                    self._notify()
                    fastest = max((r.index for r in self._readers), default=self._first)
                    while self._readers and self._bytes(fastest) > AHEAD_BYTES:
                        await self.changed()
                        fastest = max((r.index for r in self._readers), default=self._first)
                self._ended = True
            except Exception as err:  # every reader gets it (a JobworkerError: its status)
                self._error = err
            finally:
                self._notify()


class _FellBehind(Exception):
    """The reader's next chunk was dropped: it goes on with a stream of its own."""


class Fanout:
    """The shared streams of the jobs followed through this front."""

    def __init__(self) -> None:
        self._shared: dict[str, _Shared] = {}

    async def follow(self, job_id: str, offset: int, source: Source) -> AsyncIterator[OutputChunk]:
        """``job_id``'s output from ``offset``, followed to the job's end: from the job's
        shared stream where it holds ``offset``, else (and once this follower falls too
        far behind) from ``source`` alone."""
        shared = self._shared.get(job_id)
        if shared is None or shared.closed:
            shared = self._shared[job_id] = _Shared(source, offset)
        reader = shared.join(offset)
        if reader is None:
            async with contextlib.aclosing(source(offset)) as alone:  # type: ignore[type-var]
                async for chunk in alone:
                    yield chunk
            return
        try:
            while True:
                try:
                    got = shared.next_chunk(reader)
                except StopAsyncIteration:
                    return
                except _FellBehind:
                    log.info("output_follower_alone", job_id=job_id, offset=offset)
                    break
                if got is None:
                    await shared.changed()
                    continue
                yield got
                offset = got.offset
        finally:
            shared.leave(reader)
            if shared.closed and self._shared.get(job_id) is shared:
                del self._shared[job_id]
        async with contextlib.aclosing(source(offset)) as alone:  # type: ignore[type-var]
            async for chunk in alone:
                yield chunk

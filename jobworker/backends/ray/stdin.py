"""stdin of a cluster job: the front's side and the agent's.

The client's chunks reach the front over gRPC; the front joins those already there into
pieces of up to :data:`PIECE_BYTES` (:func:`pieces`), one agent call each, so a fast
writer does not pay a round trip per client chunk. It reads at most :data:`READ_AHEAD`
client chunks ahead of the piece in flight. On the node, an :class:`InputSession` hands
each piece to the local engine's writer (:meth:`JobManager.write_input`), which takes the
next only once the one before is wholly in the job's pipe; the agent's call answers as
soon as the piece is queued behind it. So a slow reader slows the client as on a single
server, the front and the agent each hold a bounded amount, and the byte count and
``closed`` come from the node's engine itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import attrs

from jobworker.model import InputChunk, InputResult

#: Largest piece of stdin sent to an agent in one call.
PIECE_BYTES = 1 << 20
#: Client chunks the front reads ahead of the piece in flight.
READ_AHEAD = 4
#: A stdin writer that gets no piece for this long ends (stdin stays open): what a writer
#: holds is given back even when its front server died in the middle.
INPUT_IDLE_SECONDS = 600.0


async def pieces(chunks: AsyncIterator[InputChunk]) -> AsyncIterator[InputChunk]:
    """``chunks`` joined into pieces of up to :data:`PIECE_BYTES` while more are already
    here; ends after the ``eof`` chunk or with ``chunks``, and raises what ``chunks``
    raises."""
    ahead: asyncio.Queue[InputChunk | None] = asyncio.Queue(READ_AHEAD)

    async def read() -> None:
        async for chunk in chunks:
            await ahead.put(chunk)
            if chunk.eof:
                break
        await ahead.put(None)

    reader = asyncio.ensure_future(read())
    try:
        while (chunk := await _next(ahead, reader)) is not None:
            data, eof, end = [chunk.data], chunk.eof, False
            size = len(chunk.data)
            while not eof and size < PIECE_BYTES and not ahead.empty():
                more = ahead.get_nowait()
                if more is None:
                    end = True
                    break
                data.append(more.data)
                size += len(more.data)
                eof = more.eof
            yield InputChunk(b"".join(data), eof)
            if eof or end:
                return
    finally:
        reader.cancel()


async def _next(
    ahead: asyncio.Queue[InputChunk | None], reader: asyncio.Future[None]
) -> InputChunk | None:
    """The next chunk read ahead; the reader's error if it failed first."""
    getter = asyncio.ensure_future(ahead.get())
    either: list[asyncio.Future[Any]] = [getter, reader]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if not getter.done() and reader.done() and reader.exception() is not None:
        getter.cancel()
        reader.result()
    return await getter


@attrs.define(eq=False)
class InputSession:
    """One writer of a job's stdin, fed by the front a piece per call; ``idle`` once it
    ended for want of pieces (its front server is gone, or very slow)."""

    feed: asyncio.Queue[InputChunk | None] = attrs.Factory(lambda: asyncio.Queue(1))
    asked: asyncio.Event = attrs.Factory(asyncio.Event)
    writer: asyncio.Task[InputResult] | None = None
    idle: bool = False

    async def chunks(self) -> AsyncIterator[InputChunk]:
        while True:
            self.asked.set()
            try:
                chunk = await asyncio.wait_for(self.feed.get(), INPUT_IDLE_SECONDS)
            except TimeoutError:
                self.idle = True
                return
            if chunk is None:
                return
            yield chunk

    async def until(self, step: Awaitable[object]) -> InputResult | None:
        """Await ``step`` unless the writer ends first; the writer's result if it did."""
        assert self.writer is not None
        pending = asyncio.ensure_future(step)
        await asyncio.wait([pending, self.writer], return_when=asyncio.FIRST_COMPLETED)
        if not pending.done():
            pending.cancel()
        if self.writer.done():
            return self.writer.result()
        return None

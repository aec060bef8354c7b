"""The front's pieces of a cluster job's stdin (jobworker/backends/ray/stdin.py): joined
while chunks are already there, never past an eof, a failing client's error passed on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from jobworker.backends.ray import stdin
from jobworker.backends.ray.stdin import PIECE_BYTES, pieces
from jobworker.model import InputChunk, InputResult


async def _source(chunks: list[InputChunk], pause: float = 0.0) -> AsyncIterator[InputChunk]:
    for chunk in chunks:
        if pause:
            await asyncio.sleep(pause)
        yield chunk


async def _all(source: AsyncIterator[InputChunk]) -> list[InputChunk]:
    return [piece async for piece in pieces(source)]


def test_chunks_already_there_are_joined_up_to_a_piece_in_order() -> None:
    chunks = [InputChunk(bytes([i]) * (256 << 10)) for i in range(9)]
    got = asyncio.run(_all(_source([*chunks, InputChunk(eof=True)])))
    assert b"".join(p.data for p in got) == b"".join(c.data for c in chunks)
    assert all(len(p.data) <= PIECE_BYTES + (256 << 10) for p in got)
    assert len(got) < len(chunks)  # joined: fewer agent calls than client chunks
    assert [p.eof for p in got] == [False] * (len(got) - 1) + [True]


def test_slow_chunks_go_one_by_one_and_nothing_after_eof() -> None:
    chunks = [InputChunk(b"a"), InputChunk(b"b", eof=True), InputChunk(b"after")]
    got = asyncio.run(_all(_source(chunks, pause=0.05)))
    assert [(p.data, p.eof) for p in got] == [(b"a", False), (b"b", True)]


def test_a_failing_client_fails_the_pieces() -> None:
    async def failing() -> AsyncIterator[InputChunk]:
        yield InputChunk(b"x")
        await asyncio.sleep(0.05)
        raise ConnectionResetError("client gone")

    with pytest.raises(ConnectionResetError):
        asyncio.run(_all(failing()))


def test_a_session_without_pieces_ends_its_writer_as_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stdin, "INPUT_IDLE_SECONDS", 0.05)

    async def scenario() -> tuple[stdin.InputSession, InputResult | None]:
        session = stdin.InputSession()
        taken: list[bytes] = []

        async def writer() -> InputResult:  # as JobManager.write_input consumes its chunks
            async for chunk in session.chunks():
                taken.append(chunk.data)
            return InputResult(sum(map(len, taken)), closed=False)

        session.writer = asyncio.ensure_future(writer())
        first = await session.until(session.feed.put(InputChunk(b"abc")))
        assert first is None  # queued: the writer runs on
        return session, await session.writer

    session, result = asyncio.run(scenario())
    assert session.idle and result == InputResult(3, closed=False)

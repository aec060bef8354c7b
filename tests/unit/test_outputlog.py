"""The output log on its own: records, cursors, followers (a file, no processes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from jobworker.errors import InvalidArgument
from jobworker.model import Stream
from jobworker.outputlog import OutputChunk, OutputLog


async def drain(log: OutputLog, offset: int = 0) -> list[OutputChunk]:
    return [chunk async for chunk in log.follow(offset, follow=False)]


def test_resume_at_any_boundary_of_a_long_log(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "job.out")
    for i in range(3000):  # alternating streams: no two records merge into one chunk
        log.append(Stream.STDOUT if i % 2 == 0 else Stream.STDERR, f"{i};".encode())
    log.close()
    chunks = asyncio.run(drain(log))
    assert len(chunks) == 3000
    assert b"".join(c.data for c in chunks) == b"".join(f"{i};".encode() for i in range(3000))
    for i in (0, 1, 255, 256, 257, 1000, 2998):
        resumed = asyncio.run(drain(log, chunks[i].offset))
        assert [c.data for c in resumed] == [c.data for c in chunks[i + 1 :]]
    with pytest.raises(InvalidArgument, match="not a chunk boundary"):
        log.follow(chunks[1000].offset + 1)
    with pytest.raises(InvalidArgument, match="beyond"):
        log.follow(log.size + 1)
    log.remove()


def test_big_write_is_split_into_records_and_merged_for_followers(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "job.out")
    data = bytes(range(256)) * 4096  # 1 MiB: sixteen 64 KiB records
    log.append(Stream.STDOUT, data)
    log.close()
    chunks = asyncio.run(drain(log))
    assert b"".join(c.data for c in chunks) == data
    sizes = [len(c.data) for c in chunks]
    assert max(sizes) == 256 * 1024 and len(sizes) <= 5  # merged, up to the message cap
    assert log.payload_bytes == len(data) and log.size == len(data) + 16 * 5
    log.remove()
    assert not (tmp_path / "job.out").exists()


def test_followers_that_give_up_leave_nothing_behind(tmp_path: Path) -> None:
    """A job that writes nothing must not collect a future per follower that gave up."""
    log = OutputLog(tmp_path / "job.out")

    async def give_up(n: int) -> int:
        async def follow() -> None:
            async for _ in log.follow(0):
                pass

        tasks = [asyncio.ensure_future(follow()) for _ in range(n)]
        await asyncio.sleep(0.05)
        waiting = len(log._waiters)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return waiting

    assert asyncio.run(give_up(2000)) == 2000
    assert len(log._waiters) == 0
    log.remove()

"""The output log on its own: records, cursors, followers (a file, no processes)."""

from __future__ import annotations

import asyncio
import os
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


def test_resume_exactly_at_the_end(tmp_path: Path) -> None:
    """The offset of the last chunk is a valid cursor: nothing more, no error, no wait."""

    async def main() -> None:
        log = OutputLog(tmp_path / "job.out")
        log.append(Stream.STDOUT, b"first")
        log.append(Stream.STDERR, b"last")
        end = log.size
        chunks = await drain(log)
        assert chunks[-1].offset == end
        assert await drain(log, end) == []  # a live log, without follow: what exists
        # Following from the end of a live log waits for the next record, and gets it.
        follower = log.follow(end)
        pending = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.05)
        assert not pending.done()
        log.append(Stream.STDOUT, b"more")
        assert await asyncio.wait_for(pending, 5) == OutputChunk(Stream.STDOUT, b"more", log.size)
        await follower.aclose()
        log.close()
        # Finished: the final offset ends the stream at once, with or without follow.
        for follow in (False, True):
            rest = [c async for c in log.follow(log.size, follow=follow)]
            assert rest == []
        log.remove()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_checking_a_resume_offset_reads_a_bounded_number_of_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cursor deep into a long log is checked from a nearby mark, not from the start."""
    log = OutputLog(tmp_path / "job.out")
    for i in range(3000):
        log.append(Stream.STDOUT if i % 2 == 0 else Stream.STDERR, b"x")
    log.close()
    chunks = asyncio.run(drain(log))
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        reads.append(offset)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    for i in (255, 2000, 2999):
        reads.clear()
        log.follow(chunks[i].offset)  # validates now; reading would start later
        assert len(reads) <= 256, (i, len(reads))
    log.remove()

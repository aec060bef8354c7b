"""The output log on its own: records, cursors, followers (a file, no processes)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path

import pytest

from jobworker.backends.local.outputlog import (
    FOLLOW_CHUNK_MAX,
    FOLLOW_RAMP_BYTES,
    KEEPING_UP,
    OutputChunk,
    OutputLog,
    next_chunk_max,
)
from jobworker.backends.local.spoolwriter import CHUNK_MAX, SpoolBudget
from jobworker.errors import DataLoss, FailedPrecondition, InvalidArgument
from jobworker.model import Stream


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
    with pytest.raises(InvalidArgument) as beyond:
        log.follow(log.size + 1)
    assert str(beyond.value) == (
        f"offset {log.size + 1} is beyond the {log.size} bytes of output so far;"
        " pass the offset of a chunk you received"
    )
    log.remove()


def test_big_write_is_split_into_records_and_merged_for_followers(tmp_path: Path) -> None:
    """A prompt follower gets one-record chunks for its first FOLLOW_RAMP_BYTES, then
    merged ones up to the message cap."""
    log = OutputLog(tmp_path / "job.out")
    data = bytes(range(256)) * 4096 * 12  # 12 MiB: 192 records of 64 KiB
    log.append(Stream.STDOUT, data)
    log.close()
    chunks = asyncio.run(drain(log))
    assert b"".join(c.data for c in chunks) == data
    sizes = [len(c.data) for c in chunks]
    ramp = FOLLOW_RAMP_BYTES // CHUNK_MAX
    assert sizes[:ramp] == [CHUNK_MAX] * ramp
    assert sizes[ramp : ramp + 2] == [2 * CHUNK_MAX, 4 * CHUNK_MAX]
    assert max(sizes) == FOLLOW_CHUNK_MAX == 256 * 1024
    assert log.payload_bytes == len(data) and log.size == len(data) + 192 * 5
    log.remove()
    assert not (tmp_path / "job.out").exists()


def test_a_slow_follower_gets_smaller_chunks_again(tmp_path: Path) -> None:
    """Chunks shrink back to one record when the consumer takes long over each."""
    log = OutputLog(tmp_path / "job.out")
    data = bytes(range(256)) * 4096 * 16
    log.append(Stream.STDOUT, data)
    log.close()

    async def main() -> list[int]:
        sizes = []
        async for chunk in log.follow():
            sizes.append(len(chunk.data))
            if len(sizes) > FOLLOW_RAMP_BYTES // CHUNK_MAX + 4:
                await asyncio.sleep(KEEPING_UP * 1.5)
                if len(sizes) > FOLLOW_RAMP_BYTES // CHUNK_MAX + 7:
                    break
        return sizes

    sizes = asyncio.run(main())
    assert FOLLOW_CHUNK_MAX in sizes
    assert sizes[-4:] == [FOLLOW_CHUNK_MAX, FOLLOW_CHUNK_MAX // 2, CHUNK_MAX, CHUNK_MAX]
    log.remove()


def test_next_chunk_max() -> None:
    assert next_chunk_max(CHUNK_MAX, 0.0, FOLLOW_RAMP_BYTES - 1) == CHUNK_MAX
    assert next_chunk_max(CHUNK_MAX, 0.0, FOLLOW_RAMP_BYTES) == 2 * CHUNK_MAX
    assert next_chunk_max(FOLLOW_CHUNK_MAX, 0.0, 10 * FOLLOW_RAMP_BYTES) == FOLLOW_CHUNK_MAX
    assert next_chunk_max(FOLLOW_CHUNK_MAX, KEEPING_UP * 2, 0) == FOLLOW_CHUNK_MAX // 2
    assert next_chunk_max(CHUNK_MAX, KEEPING_UP * 2, 0) == CHUNK_MAX


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


def test_payload_and_size_add_up_over_appends(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "job.out")
    log.append(Stream.STDOUT, b"abc")
    log.append(Stream.STDERR, b"de")
    assert (log.payload_bytes, log.size) == (5, 5 + 2 * 5)
    log.remove()


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pwritev may write less than asked (rare on a regular file): the rest follows."""
    real_pwritev = os.pwritev

    def short_pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        first = bytes(buffers[0])[:3]  # part of the first record's header only
        return real_pwritev(fd, [first], offset)

    def short_pwrite(fd: int, data: bytes, offset: int) -> int:
        return real_pwrite(fd, data[:7], offset)  # the rest, seven bytes at a time

    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    monkeypatch.setattr(os, "pwrite", short_pwrite)
    log = OutputLog(tmp_path / "job.out")
    log.append(Stream.STDOUT, b"hello, ")
    log.append(Stream.STDERR, b"short writes")
    log.close()
    monkeypatch.undo()
    chunks = asyncio.run(drain(log))
    assert [(c.stream, c.data) for c in chunks] == [
        (Stream.STDOUT, b"hello, "),
        (Stream.STDERR, b"short writes"),
    ]
    assert (tmp_path / "job.out").stat().st_size == log.size == 7 + 12 + 2 * 5
    log.remove()


def test_follow_defaults_to_the_start(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "job.out")
    log.append(Stream.STDOUT, b"all of it")
    log.close()

    async def everything() -> list[bytes]:
        return [c.data async for c in log.follow()]

    assert asyncio.run(everything()) == [b"all of it"]
    log.remove()


def test_no_follow_reads_what_existed_when_asked(tmp_path: Path) -> None:
    """Without follow, output appended while the reader reads is not part of its answer."""

    async def main() -> None:
        log = OutputLog(tmp_path / "job.out")
        log.append(Stream.STDOUT, b"one")
        log.append(Stream.STDERR, b"two")
        reader = log.follow(0, follow=False)
        first = await anext(reader)
        log.append(Stream.STDOUT, b"later")
        rest = [c.data async for c in reader]
        assert (first.data, rest) == (b"one", [b"two"])
        log.remove()

    asyncio.run(main())


def test_removed_log_and_vanished_file(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "job.out")
    log.append(Stream.STDOUT, b"kept")
    # While the job runs the writer's descriptor serves new followers, even if something
    # (a temporary-file cleaner) unlinked the file.
    (tmp_path / "job.out").unlink()
    assert asyncio.run(drain(log)) == [OutputChunk(Stream.STDOUT, b"kept", 9)]
    log.close()  # finished: followers open the file by name, and it is gone
    with pytest.raises(FailedPrecondition) as gone:
        log.follow()
    assert str(gone.value) == f"the spooled output of this job is gone from {tmp_path}"
    log.remove()
    with pytest.raises(InvalidArgument) as removed:
        log.follow()
    assert str(removed.value) == "the output of this job was removed"


def _straddling_log(path: Path, first: int, alternate: bool) -> tuple[OutputLog, list[bytes]]:
    """A record of ``first`` bytes, then 1100 of 1000 bytes, one stream or alternating."""
    log = OutputLog(path)
    records = [bytes([65 + i % 26]) * (first if i == 0 else 1000) for i in range(1101)]
    for i, data in enumerate(records):
        log.append(Stream.STDERR if alternate and i % 2 else Stream.STDOUT, data)
    log.close()
    return log, records


# Where the follower's read-ahead buffer (1 MiB from offset 0) ends: inside a header in the
# middle of a merged chunk (a first record of 354 bytes), 3 bytes before the end of a
# record's data (359), and inside the data of a record that starts a chunk (alternating).
@pytest.mark.parametrize(
    ("first", "alternate"), [(354, False), (359, False), (1000, True)], ids=str
)
def test_records_straddling_the_read_ahead_buffer(
    tmp_path: Path, first: int, alternate: bool
) -> None:
    log, records = _straddling_log(tmp_path / "job.out", first, alternate)
    chunks = asyncio.run(drain(log))
    assert b"".join(c.data for c in chunks) == b"".join(records)
    if alternate:
        assert [c.data for c in chunks] == records
    log.remove()


def test_spool_file_is_new_and_private(tmp_path: Path) -> None:
    planted = tmp_path / "job.out"
    planted.symlink_to(tmp_path / "elsewhere")  # a name taken before the job: never reused
    with pytest.raises(FileExistsError):
        OutputLog(planted)
    assert not (tmp_path / "elsewhere").exists()
    log = OutputLog(tmp_path / "other.out")
    assert stat.S_IMODE((tmp_path / "other.out").stat().st_mode) == 0o600
    log.remove()


def test_remove_ends_waiting_followers(tmp_path: Path) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "job.out")
        log.append(Stream.STDOUT, b"seen")
        follower = asyncio.ensure_future(drain_following(log))
        await asyncio.sleep(0.05)  # the follower read "seen" and waits for more
        assert not follower.done()
        log.remove()
        assert await asyncio.wait_for(follower, 5) == [b"seen"]

    asyncio.run(main())


async def drain_following(log: OutputLog) -> list[bytes]:
    return [c.data async for c in log.follow(0, follow=True)]


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


# -- the cut: kept up to the cap, the budget or a failed write, then DATA_LOSS ---------------


async def read_until_loss(log: OutputLog, offset: int = 0, follow: bool = True) -> bytes:
    """What a follower receives before the DATA_LOSS that must end its stream."""
    received = b""
    with pytest.raises(DataLoss) as loss:
        async for chunk in log.follow(offset, follow=follow):
            received += chunk.data
    assert received, "a follower from the start gets what was kept first"
    return received + b"|" + str(loss.value).encode()


def test_the_cap_cuts_the_log_and_followers_get_data_loss_after_what_was_kept(
    tmp_path: Path,
) -> None:
    log = OutputLog(tmp_path / "job.out", max_bytes=10)
    log.append(Stream.STDOUT, b"hello ")
    log.append(Stream.STDERR, b"world!!!")  # 4 of these 8 bytes fit
    log.append(Stream.STDOUT, b"more")  # read and counted, not kept
    assert (log.truncated, log.kept_bytes, log.payload_bytes) == (True, 10, 18)
    reason = "the job's output cap of 10 bytes (serve --max-output-bytes)"
    assert log.cut_reason == reason
    message = f"the output was cut after 10 bytes kept of 18 written so far, by {reason}"
    expected = f"hello worl|{message}; the rest is lost".encode()
    # Not the clean end of a complete log: DATA_LOSS while the job still runs and after.
    assert asyncio.run(read_until_loss(log, follow=False)) == expected
    log.close()
    assert asyncio.run(read_until_loss(log)) == expected
    with pytest.raises(DataLoss):  # a follower that resumes at the cut: DATA_LOSS at once
        asyncio.run(drain(log, log.size))
    log.remove()


def test_a_live_follower_gets_data_loss_at_the_cut_while_the_job_goes_on(
    tmp_path: Path,
) -> None:
    async def body() -> bytes:
        log = OutputLog(tmp_path / "job.out", max_bytes=4)
        follower = asyncio.create_task(read_until_loss(log))
        log.append(Stream.STDOUT, b"ab")
        await asyncio.sleep(0.01)  # the follower took "ab" and waits for more
        log.append(Stream.STDOUT, b"cdef")
        try:
            return await asyncio.wait_for(follower, 5)  # the log is not closed
        finally:
            log.remove()

    assert asyncio.run(body()).startswith(b"abcd|the output was cut after 4 bytes kept of 6")


def test_the_spool_budget_is_shared_and_cuts_at_a_whole_record(tmp_path: Path) -> None:
    header = 5
    budget = SpoolBudget(2 * header + 10)
    first = OutputLog(tmp_path / "first.out", budget=budget.account("alice"))
    second = OutputLog(tmp_path / "second.out", budget=budget.account("bob"))
    first.append(Stream.STDOUT, b"0123456789")  # one record: 15 of the 20 bytes
    second.append(Stream.STDOUT, b"abcdefgh")  # 5 left: a header and nothing else
    assert (first.truncated, second.truncated) == (False, True)
    assert second.kept_bytes == 0 and budget.used == header + 10
    assert second.cut_reason == (
        "the server's spool budget of 20 bytes for all jobs (serve --max-spool-bytes)"
    )
    with pytest.raises(DataLoss, match="cut after 0 bytes kept of 8 written so far"):
        asyncio.run(drain(second))
    second.remove()
    first.remove()
    assert budget.used == 0  # each removed log gave back what it charged


def test_a_failed_write_cuts_the_log_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = OutputLog(tmp_path / "job.out")
    log.append(Stream.STDOUT, b"kept\n")

    def disk_full(*_: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", disk_full)
    log.append(Stream.STDOUT, b"lost\n")
    monkeypatch.undo()
    log.append(Stream.STDOUT, b"after\n")  # nothing is written past a cut
    log.close()
    assert log.cut_reason == "writing the spool failed: No space left on device"
    assert asyncio.run(read_until_loss(log)) == (
        b"kept\n|the output was cut after 5 bytes kept of 16 written so far, by writing the"
        b" spool failed: No space left on device; the rest is lost"
    )
    log.remove()


def test_a_client_gets_its_share_of_the_spool_and_no_more(tmp_path: Path) -> None:
    header = 5
    budget = SpoolBudget(100 * (header + 10), per_client=2 * (header + 10))
    alice = [OutputLog(tmp_path / f"alice-{n}.out", budget=budget.account("alice")) for n in "12"]
    for log in alice:
        log.append(Stream.STDOUT, b"0123456789")  # two records: alice's whole share
    late = OutputLog(tmp_path / "alice-3.out", budget=budget.account("alice"))
    late.append(Stream.STDOUT, b"more")
    assert late.truncated and late.kept_bytes == 0
    assert late.cut_reason == (
        "alice's share of the server's spool, 30 bytes for all of its jobs"
        " (serve --max-spool-bytes-per-client)"
    )
    bob = OutputLog(tmp_path / "bob.out", budget=budget.account("bob"))
    bob.append(Stream.STDOUT, b"0123456789")
    assert not bob.truncated and budget.used_by() == {"alice": 30, "bob": 15}
    alice[0].remove()  # a removed log frees its owner's share
    again = OutputLog(tmp_path / "alice-4.out", budget=budget.account("alice"))
    again.append(Stream.STDOUT, b"0123456789")
    assert not again.truncated
    for log in (*alice[1:], late, bob, again):
        log.remove()
    assert budget.used == 0 and budget.used_by() == {}

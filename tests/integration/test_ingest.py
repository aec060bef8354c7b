"""The ingest threads: read pipes into their sinks in order, with bounded memory; a pipe's
end is not held up by another pipe's slow spool write; both threads run first in line for
the CPU."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from jobworker.backends.local.ingest import PENDING_PER_PIPE, PRIORITY, Ingest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="raising a priority needs root")


def _pipe() -> tuple[int, int]:
    return os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)


async def _drain_one_pipe() -> tuple[bytes, list[int], int]:
    """Write to a pipe, ingest it; what arrived, the threads' nice values, the loop's."""
    loop = asyncio.get_running_loop()
    ingest = Ingest(loop, 1 << 16)
    r, w = _pipe()
    got: list[bytes] = []
    ended = loop.create_future()
    ingest.add(r, got.append, lambda: ended.set_result(None))
    os.write(w, b"x" * 1000)
    os.close(w)
    await asyncio.wait_for(ended, 10)
    nice = [os.getpriority(os.PRIO_PROCESS, tid) for tid in ingest.native_ids if tid]
    ingest.close()
    return b"".join(got), nice, os.getpriority(os.PRIO_PROCESS, 0)


@needs_root
def test_the_ingest_threads_run_ahead_of_the_loop() -> None:
    ours = os.getpriority(os.PRIO_PROCESS, 0)  # not 0 in a suite run under `nice`
    data, ingest_nice, loop_nice = asyncio.run(_drain_one_pipe())
    assert data == b"x" * 1000
    assert ingest_nice == [PRIORITY, PRIORITY] == [-20, -20]
    assert loop_nice == ours  # the rest of the server (and the jobs it forks) unchanged


@needs_root
def test_without_the_capability_ingest_keeps_its_priority_and_says_why() -> None:
    """Root without CAP_SYS_NICE, as an unprivileged server would be: no change, a log line,
    and output still flows."""
    script = textwrap.dedent(
        """
        import asyncio, structlog, sys
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stdout))
        sys.path.insert(0, sys.argv[1])
        from test_ingest import _drain_one_pipe
        data, nice, _ = asyncio.run(_drain_one_pipe())
        print("RESULT", len(data), nice)
        """
    )
    drop = ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice"]
    here = os.path.dirname(__file__)
    result = subprocess.run(
        [*drop, sys.executable, "-c", script, here],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = os.getpriority(os.PRIO_PROCESS, 0)  # the child's too
    assert f"RESULT 1000 [{ours}, {ours}]" in result.stdout, result
    assert "ingest_priority_unchanged" in result.stdout, result


def test_reads_reach_the_sink_in_read_order_and_the_end_after_the_last() -> None:
    """Two pipes written in turn: the writer hands reads over in the order they were read
    (a job's stdout/stderr order), and each pipe's end comes after its last byte."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ingest = Ingest(loop, 1 << 16)
        events: list[tuple[str, bytes]] = []
        ended = {"a": loop.create_future(), "b": loop.create_future()}
        pipes = {name: _pipe() for name in ended}
        for name, (r, _) in pipes.items():

            def sink(data: bytes, name: str = name) -> None:
                events.append((name, data))

            def eof(name: str = name) -> None:
                events.append((name, b"<end>"))
                ended[name].set_result(None)

            ingest.add(r, sink, eof)
        for i in range(40):
            name = "ab"[i % 2]
            os.write(pipes[name][1], f"{name}{i};".encode())
            # Each write read and handed over before the next, however loaded the machine:
            # the order across pipes is then the order of the writes.
            deadline = time.monotonic() + 10
            while len(events) <= i:
                assert time.monotonic() < deadline, events
                await asyncio.sleep(0.001)
        for _, w in pipes.values():
            os.close(w)
        await asyncio.wait_for(asyncio.gather(*ended.values()), 10)
        ingest.close()
        for name in ended:
            mine = [data for who, data in events if who == name]
            assert mine[-1] == b"<end>"
            expected = "".join(f"{name}{i};" for i in range(40) if "ab"[i % 2] == name)
            assert b"".join(mine[:-1]).decode() == expected
        # Across pipes, the order of the numbers is the order of the writes.
        numbers = [
            int(part[1:])
            for _, data in events
            if data != b"<end>"
            for part in data.decode().split(";")
            if part
        ]
        assert numbers == sorted(numbers)

    asyncio.run(main())


def test_a_pipe_ends_at_once_while_another_pipes_spool_write_is_stuck() -> None:
    """The reader notices a pipe's end even while the writer is held in a slow sink (a
    throttled disk) for another pipe: stopping one job does not wait on another's writes."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ingest = Ingest(loop, 1 << 16)
        stuck, release = threading.Event(), threading.Event()

        def slow_sink(data: bytes) -> None:
            stuck.set()
            release.wait(30)

        busy_r, busy_w = _pipe()
        busy_end = loop.create_future()
        ingest.add(busy_r, slow_sink, lambda: busy_end.set_result(None))
        os.write(busy_w, b"x" * 4096)
        await asyncio.to_thread(stuck.wait, 10)

        idle_r, idle_w = _pipe()
        idle_end = loop.create_future()
        ingest.add(idle_r, lambda data: None, lambda: idle_end.set_result(None))
        began = time.monotonic()
        os.close(idle_w)
        await asyncio.wait_for(idle_end, 10)
        assert time.monotonic() - began < 1.0  # the sink is held for 30 s
        assert not busy_end.done()
        release.set()
        os.close(busy_w)
        await asyncio.wait_for(busy_end, 10)
        ingest.close()

    asyncio.run(main())


def test_a_pipe_waiting_on_the_writer_is_not_read_past_its_bound() -> None:
    """Memory: while the sink is stuck, a job writing without pause has at most
    PENDING_PER_PIPE reads (plus the one in hand) read from its pipe; the rest waits in the
    pipe, and arrives, in full and in order, once the sink moves."""
    read_size = 1 << 16

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ingest = Ingest(loop, read_size)
        release = threading.Event()
        got: list[bytes] = []

        def sink(data: bytes) -> None:
            release.wait(30)
            got.append(data)

        r, w = os.pipe2(os.O_CLOEXEC)  # blocking: the writer thread waits on a full pipe
        ended = loop.create_future()
        ingest.add(r, sink, lambda: ended.set_result(None))
        payload = bytes(range(256)) * (64 * 1024)  # 16 MiB

        def write_all() -> None:
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view) :]
            os.close(w)

        writer = threading.Thread(target=write_all)
        writer.start()
        peak = 0
        for _ in range(50):
            await asyncio.sleep(0.02)
            peak = max(peak, ingest.pending_bytes)
        assert 0 < peak <= (PENDING_PER_PIPE + 1) * read_size
        release.set()
        await asyncio.wait_for(ended, 30)
        writer.join()
        ingest.close()
        assert b"".join(got) == payload

    asyncio.run(main())


def test_drop_writes_what_was_read_then_closes() -> None:
    """A pipe dropped (a leftover process holds its other end) while its reads wait for
    the writer: they are written first, then the pipe is closed and its end reported."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ingest = Ingest(loop, 1 << 16)
        entered, release = threading.Event(), threading.Event()
        got: list[bytes] = []
        ends: list[str] = []

        def sink(data: bytes) -> None:
            entered.set()
            release.wait(30)
            got.append(data)

        r, w = _pipe()
        pipe = ingest.add(r, sink, lambda: ends.append("end"))
        os.write(w, b"before the drop")
        await asyncio.to_thread(entered.wait, 10)
        assert ingest.pending_bytes == len(b"before the drop")
        dropped = ingest.drop(pipe)
        await asyncio.sleep(0.1)
        assert not dropped.done() and not ends
        release.set()
        await asyncio.wait_for(dropped, 10)
        assert got == [b"before the drop"] and ends == ["end"]
        with pytest.raises(OSError):
            os.fstat(r)  # closed by the ingest threads
        os.close(w)
        ingest.close()

    asyncio.run(main())


def test_drops_racing_reads_of_the_same_pipes_neither_crash_nor_lose_an_end() -> None:
    """Pipes dropped while they carry data: a drop served in the same batch of events as
    the pipe's own readiness must not read a pipe already ended (and maybe closed, its
    number reused). Every pipe reports its end exactly once, and the threads live on."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ingest = Ingest(loop, 1 << 16)
        ends: list[int] = []
        writers: list[int] = []
        drops = []
        for i in range(300):
            r, w = _pipe()
            writers.append(w)
            pipe = ingest.add(r, lambda data: None, lambda i=i: ends.append(i))
            os.write(w, b"x" * 100)
            drops.append(ingest.drop(pipe))
            if i % 10 == 0:
                await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(*drops), 20)
        assert sorted(ends) == list(range(300))
        # Still alive: a new pipe is read and ended as usual.
        r, w = _pipe()
        ended = loop.create_future()
        got: list[bytes] = []
        ingest.add(r, got.append, lambda: ended.set_result(None))
        os.write(w, b"after")
        os.close(w)
        await asyncio.wait_for(ended, 10)
        assert got == [b"after"]
        for w in writers:
            os.close(w)
        ingest.close()

    asyncio.run(main())

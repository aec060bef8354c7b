"""The ingest thread: reads a pipe into its sink, and runs first in line for the CPU."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from jobworker.ingest import PRIORITY, Ingest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="raising a priority needs root")


async def _drain_one_pipe() -> tuple[bytes, int | None, int]:
    """Write to a pipe, ingest it; what arrived, the thread's nice value, the loop's."""
    loop = asyncio.get_running_loop()
    ingest = Ingest(loop, 1 << 16)
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    got: list[bytes] = []
    ended = loop.create_future()
    ingest.add(r, got.append, lambda: ended.set_result(None))
    os.write(w, b"x" * 1000)
    os.close(w)
    await asyncio.wait_for(ended, 10)
    tid = ingest.native_id
    assert tid is not None
    nice = os.getpriority(os.PRIO_PROCESS, tid)
    ingest.close()
    return b"".join(got), nice, os.getpriority(os.PRIO_PROCESS, 0)


@needs_root
def test_the_ingest_thread_runs_ahead_of_the_loop() -> None:
    data, ingest_nice, loop_nice = asyncio.run(_drain_one_pipe())
    assert data == b"x" * 1000
    assert ingest_nice == PRIORITY == -20
    assert loop_nice == 0  # the rest of the server (and the jobs it forks) unchanged


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
    assert "RESULT 1000 0" in result.stdout, result
    assert "ingest_priority_unchanged" in result.stdout, result

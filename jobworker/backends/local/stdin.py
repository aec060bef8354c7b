"""A job's stdin: one writer at a time, flow-controlled by the pipe itself."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import structlog

from jobworker.backends.local.job import Job
from jobworker.backends.local.spawn import resolve_future
from jobworker.errors import FailedPrecondition
from jobworker.model import InputChunk, InputResult

log = structlog.get_logger("jobworker.backends.local.stdin")


async def write_input(job: Job, chunks: AsyncIterator[InputChunk]) -> InputResult:
    """Copy ``chunks`` into the job's stdin; one writer at a time.

    Flow control: the next chunk is taken only when the previous one is wholly in the
    pipe, so the server holds at most one chunk per job and a slow reader slows the
    writer. Ends at ``eof`` (stdin closed), when ``chunks`` ends (stdin stays open for
    a later writer), or when the job closes its end or exits (EPIPE); a closed stdin
    takes nothing (``closed`` set). Raises FailedPrecondition when the job was started
    without stdin or another writer holds it.
    """
    if not job.spec.stdin:
        raise FailedPrecondition(
            f"job {job.job_id} was started without stdin (it reads /dev/null); start it"
            " with `-i` (StartJobRequest.stdin) to write to it"
        )
    if job.stdin < 0:  # closed by eof, by the job, or at its end: like a reader gone
        return InputResult(0, closed=True)
    if job.stdin_writer:
        raise FailedPrecondition(
            f"another client is writing to job {job.job_id}'s stdin; wait until it finishes"
        )
    job.stdin_writer = True
    written = 0
    try:
        async for chunk in chunks:
            view = memoryview(chunk.data)
            while view:
                count = await _write_some(job, view)
                if count is None:
                    return InputResult(written, closed=True)
                written += count
                view = view[count:]
            if chunk.eof:
                close_stdin(job)
                return InputResult(written, closed=True)
        return InputResult(written, closed=job.stdin < 0)
    finally:
        job.stdin_writer = False


async def _write_some(job: Job, data: memoryview) -> int | None:
    """Bytes of ``data`` written once the pipe takes some; None when stdin closed."""
    while job.stdin >= 0:
        try:
            return os.write(job.stdin, data)
        except BlockingIOError:
            pass
        except OSError as err:  # EPIPE: the job's processes closed their end
            log.info("job_stdin_closed", job_id=job.job_id, reason=err.strerror)
            close_stdin(job)
            return None
        fd = job.stdin
        loop = asyncio.get_running_loop()
        job.stdin_wakeup = loop.create_future()
        loop.add_writer(fd, resolve_future, job.stdin_wakeup)
        try:
            await job.stdin_wakeup
        finally:
            job.stdin_wakeup = None
            if job.stdin == fd:
                loop.remove_writer(fd)
    return None


def close_stdin(job: Job) -> None:
    """Close the job's stdin (EOF for its reader); wake a writer blocked on it."""
    if job.stdin < 0:
        return
    asyncio.get_running_loop().remove_writer(job.stdin)
    os.close(job.stdin)
    job.stdin = -1
    if job.on_stdin_closed is not None:
        job.on_stdin_closed()
        job.on_stdin_closed = None
    if job.stdin_wakeup is not None:
        resolve_future(job.stdin_wakeup)

"""Ingestion in a process of its own: the jobs' pipes read and spooled outside the server.

Why a process: the ingest threads (:mod:`jobworker.backends.local.ingest`) share the server's GIL
with
the event loop. Every read and every spool write needs the GIL back for a moment, and
while the loop is busy sending to a follower the thread waits for it, up to the
interpreter's switch interval, with the job blocked on its full pipe. Timed on 2 cores, a
job writing 1 GiB took 1.8-1.9x as long with one follower; with the same work done in a
process beside the server, 1.08x (docs/performance.md, "Ingestion out of process"). The
helper runs the same two threads, with a GIL of its own, and reports after each spool
write what the log now holds; the loop publishes that to followers.

Used when no plugin observes output chunks (an observer needs the bytes in the server;
then the threads run in the server as before).

The helper's own side is :mod:`jobworker.backends.local.ingest_helper`. The protocol is one
``SOCK_SEQPACKET`` socket pair, a JSON object per message, descriptors
passed with ``SCM_RIGHTS``:

* server to helper: ``job`` (a job's spool file, its output cap and its pipes, in one
  message), ``drop`` (stop reading a pipe), ``forget`` (a log was removed: give its budget
  back);
* helper to server: ``state`` (a log's :class:`~jobworker.backends.local.spoolwriter.SpoolState`,
after each
  write) and ``eof`` (a pipe is closed, after its last state).

The server keeps its own descriptor of every pipe until the helper reports it closed. If
the helper dies, nothing blocks and nothing is lost silently: every log it was writing is
cut (followers get DATA_LOSS at what was reported, the job's status says why), the pipes
are drained by the in-process threads so the jobs never block or get SIGPIPE, and the next
job starts a new helper. Under ``serve --live-restore`` the helper outlives the server and
hands its pipes to the next one (:mod:`jobworker.backends.local.handover`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog

from jobworker.backends.local.ingest import Ingest, Pipe, Sink
from jobworker.backends.local.ingest_helper import (
    MESSAGE_MAX,
    send_message,
)
from jobworker.backends.local.outputlog import OutputLog
from jobworker.backends.local.spawn import spawn_helper
from jobworker.backends.local.spoolwriter import SpoolBudget, SpoolState
from jobworker.model import Stream

log = structlog.get_logger("jobworker.backends.local.ingest_process")

#: How long a helper may take to exit once the server closes its socket.
EXIT_TIMEOUT = 5.0
#: How long a new helper may take to say it is ready (Python's start-up: about 0.2 s).
READY_TIMEOUT = 10.0


@attrs.define(eq=False)
class RemotePipe:
    """A pipe the helper reads: the handle :meth:`IngestProcess.add` returns."""

    id: int
    fd: int  # the server's own descriptor of the pipe, closed at the helper's eof
    stream: Stream
    log: OutputLog
    #: What reads the pipe in the server if the helper is lost.
    sink: Sink
    on_eof: Callable[[], None]
    #: The in-process threads' handle, once the helper was lost.
    local: Pipe | None = None
    done: asyncio.Future[None] | None = None


class IngestProcess:
    """The helper process, seen from the server's event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read_size: int,
        budget: SpoolBudget,
        fallback: Callable[[], Ingest],
        live: Path | None = None,
    ) -> None:
        """``live``: the live run directory (``serve --live-restore``); the helper then
        outlives the server and waits there for the next one
        (:mod:`~jobworker.backends.local.ingest_helper`)."""
        self._loop = loop
        self._live = live
        self._read_size = read_size
        self._budget_limits = (budget.limit, budget.per_client)
        self._fallback = fallback
        self._ids = itertools.count(1)
        self._pipes: dict[int, RemotePipe] = {}
        #: Logs told to the helper (with what to call once they changed), and what the
        #: helper last said they charge the budget.
        self._logs: dict[str, tuple[OutputLog, Callable[[], None]]] = {}
        self._charged: dict[str, int] = {}
        self._sock: socket.socket | None = None
        self._pid: int | None = None
        #: Messages the helper has not taken yet, with copies of their descriptors.
        self._outbox: collections.deque[tuple[bytes, tuple[int, ...]]] = collections.deque()
        self._waiting_to_send = False
        self._ready: asyncio.Future[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    async def ready(self) -> bool:
        """Start the helper if none runs, and wait until it reads; False if it could not
        start (the caller reads the job's pipes itself, and a later job tries again)."""
        if self._sock is None:
            try:
                self._start()
            except OSError as err:
                log.error("ingest_process_failed_to_start", error=str(err))
                return False
        assert self._ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT)
        except TimeoutError:
            self._lost(f"did not start within {READY_TIMEOUT:g} s")
        return self._sock is not None

    def add(
        self,
        log_id: str,
        output: OutputLog,
        pipes: Sequence[tuple[int, Stream, Sink, Callable[[], None]]],
        published: Callable[[], None],
        resume: SpoolState | None = None,
        stdin: int = -1,
    ) -> list[RemotePipe]:
        """Have the helper read a job's pipes (``fd, stream, sink, on_eof`` each) into
        ``output``: ``published`` runs on the loop after each report of what ``output``
        holds, each ``on_eof`` once its pipe is closed. All of a job's pipes or none: with
        no helper, or no descriptor left to pass them with, the threads here read them all
        with their ``sink`` (one writer per spool file, always), as they do should the
        helper be lost later. Live restore: ``resume`` is what an earlier helper wrote of
        ``output``, to go on from; ``stdin`` the write end of the job's stdin, for the
        helper to hold (a copy) while it is open (:meth:`stdin_closed`)."""
        handles = [
            RemotePipe(next(self._ids), fd, stream, output, sink, on_eof)
            for fd, stream, sink, on_eof in pipes
        ]
        try:
            if self._sock is None:
                raise ConnectionError("the ingest process was lost since ready()")
            # Copies: the originals may be closed before the messages leave.
            held = [stdin] if stdin >= 0 and self._live is not None else []
            copies = _dup_all([output.fd, *(h.fd for h in handles), *held])
        except OSError as err:
            log.warning("ingest_in_server", reason=str(err))
            for handle in handles:
                handle.local = self._fallback().add(handle.fd, handle.sink, handle.on_eof)
            return handles
        # Known before anything is sent: if sending fails, _lost hands them to the threads.
        self._logs[log_id] = (output, published)
        for handle in handles:
            self._pipes[handle.id] = handle
        # One message: the helper must know every pipe of the log before it reads any, or
        # it would close the spool once the first pipe ended, and write the second through
        # a number the kernel may have given to another job's file.
        pipes_of = [[handle.id, int(handle.stream)] for handle in handles]
        message: dict[str, Any] = {
            "t": "job",
            "log": log_id,
            "max": output.max_bytes,
            "owner": output.owner,
            "pipes": pipes_of,
            "stdin": bool(held),
        }
        if resume is not None:
            message["state"] = attrs.asdict(attrs.evolve(resume, marks=()))
            self._charged[log_id] = resume.charged
        self._queue(message, copies)
        return handles

    def stdin_closed(self, log_id: str) -> None:
        """The server closed the job's stdin: the helper closes its copy too."""
        if log_id in self._logs and self._live is not None:
            self._queue({"t": "stdin_closed", "log": log_id})

    def register(
        self, log_id: str, output: OutputLog, published: Callable[[], None], charged: int
    ) -> None:
        """Count a complete log an earlier helper wrote (live restore) in the budget, until
        :meth:`forget`; call it before the first :meth:`ready`."""
        self._logs[log_id] = (output, published)
        self._charged[log_id] = charged

    def drop(self, pipe: RemotePipe) -> asyncio.Future[None]:
        """Stop reading ``pipe`` once what was read of it is spooled; resolves once closed."""
        if pipe.local is not None:
            return self._fallback().drop(pipe.local)
        if pipe.done is None:
            pipe.done = self._loop.create_future()
            if pipe.id in self._pipes:
                self._queue({"t": "drop", "pipe": pipe.id})
            else:
                pipe.done.set_result(None)
        return pipe.done

    def forget(self, log_id: str) -> None:
        """The log was removed: the helper gives back the budget it took."""
        known = self._logs.pop(log_id, None)
        if known is None:
            return  # its pipes were read here: the helper never knew it
        output, _ = known
        charged = self._charged.pop(log_id, 0)
        self._queue({"t": "forget", "log": log_id, "owner": output.owner, "charged": charged})

    def close(self, detach: bool = False) -> None:
        """Stop the helper (every job has ended); ``detach``: leave it reading the jobs'
        pipes for the next server (live restore)."""
        sock, pid = self._sock, self._pid
        self._sock = self._pid = None
        self._drop_outbox(sock)
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()  # the helper exits at end-of-file, or waits for the next server
        if detach:
            return
        # Pipes a shutdown gave up on: the helper stops reading them; our copies go.
        pipes = list(self._pipes.values())
        self._pipes.clear()
        for pipe in pipes:
            self._eof(pipe)
        if pid is not None and _reap(pid, EXIT_TIMEOUT) is None:
            log.error("ingest_process_kill", pid=pid, waited=EXIT_TIMEOUT)
            _kill(pid)

    # -- the helper ----------------------------------------------------------------------

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        used: dict[str, int] = collections.Counter()
        for log_id, charged in self._charged.items():
            used[self._logs[log_id][0].owner] += charged
        # -I, and the path of this very jobworker: the helper imports the server's code,
        # never a `jobworker` planted in the working directory or named by PYTHON* variables.
        code = (
            "import sys; sys.path.insert(0, sys.argv[2]); "
            "from jobworker.backends.local.ingest_helper import main; main(sys.argv[3:])"
        )
        # Its name first after the code, for `ps`; its socket is fd 3.
        args = [sys.executable, "-I", "-c", code, "jobworker-ingest"]
        args += [str(Path(__file__).parents[3]), str(self._read_size), json.dumps(used)]
        limit, per_client = self._budget_limits
        if limit is not None:
            args.append(str(limit))
        if per_client is not None:
            args += ["--per-client", str(per_client)]
        if self._live is not None:
            args += ["--live", str(self._live)]
        try:
            with theirs:
                self._pid = spawn_helper(args, theirs.fileno())
        except BaseException:
            ours.close()
            raise
        # Blocking, but every call on the loop passes MSG_DONTWAIT.
        self._sock = ours
        self._ready = self._loop.create_future()
        self._loop.add_reader(ours.fileno(), self._receive)
        log.info("ingest_process_started", pid=self._pid)

    def _queue(self, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        """Send ``message`` with ``fds`` (copies, closed once sent) as soon as the helper
        takes it; in order, and never blocking the loop. Dropped with no helper."""
        if self._sock is None:
            for fd in fds:
                os.close(fd)
            return
        self._outbox.append((json.dumps(message).encode(), fds))
        if not self._waiting_to_send:
            self._flush()

    def _flush(self) -> None:
        sock = self._sock
        while sock is not None and self._outbox:
            data, fds = self._outbox[0]
            try:
                send_message(sock, data, fds, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not self._waiting_to_send:
                    self._waiting_to_send = True
                    self._loop.add_writer(sock.fileno(), self._flush)
                return
            except OSError as err:
                self._lost(f"its socket failed: {err.strerror}")
                return
            self._outbox.popleft()
            for fd in fds:
                os.close(fd)
        if sock is not None and self._waiting_to_send:
            self._waiting_to_send = False
            self._loop.remove_writer(sock.fileno())

    def _receive(self) -> None:
        sock = self._sock
        while sock is not None and sock is self._sock:
            try:
                data = sock.recv(MESSAGE_MAX, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as err:
                self._lost(f"its socket failed: {err.strerror}")
                return
            if not data:
                self._lost("it exited")
                return
            message = json.loads(data)
            if message["t"] == "state":
                self._state(message)
            elif message["t"] == "ready":
                assert self._ready is not None
                if not self._ready.done():
                    self._ready.set_result(None)
            else:
                self._eof(self._pipes.pop(message["pipe"]))

    def _state(self, message: dict[str, Any]) -> None:
        fields = message["state"]
        state = SpoolState(**{**fields, "marks": tuple(fields["marks"])})
        known = self._logs.get(message["log"])
        if known is not None:  # else forgotten, its report already in flight
            self._charged[message["log"]] = state.charged
            output, published = known
            output.adopt(state)
            published()

    def _eof(self, pipe: RemotePipe) -> None:
        os.close(pipe.fd)
        pipe.on_eof()
        if pipe.done is not None and not pipe.done.done():
            pipe.done.set_result(None)

    def _lost(self, why: str) -> None:
        """The helper is gone (or its socket failed): cut what it was writing, and drain
        its pipes here instead."""
        sock, pid = self._sock, self._pid
        self._sock = self._pid = None
        if sock is None:
            return
        self._drop_outbox(sock)
        self._loop.remove_reader(sock.fileno())
        sock.close()
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)  # ready() sees the helper gone
        status = None
        if pid is not None:
            # It must not write on behind the threads' back (only cut logs are written
            # here, so a write it finishes in the kernel first is harmless).
            status = _kill(pid)
        reason = f"the ingest process (pid {pid}) {why} ({status or 'killed'})"
        pipes = list(self._pipes.values())
        self._pipes.clear()
        log.error("ingest_process_lost", reason=reason, pipes=len(pipes))
        for pipe in pipes:
            pipe.log.cut(reason)
            pipe.log.publish()
            pipe.local = self._fallback().add(pipe.fd, pipe.sink, pipe.on_eof)
            if pipe.done is not None:
                _chain(self._fallback().drop(pipe.local), pipe.done)
        # What the logs of the lost helper charged stays charged: the next one is told (_start).

    def _drop_outbox(self, sock: socket.socket | None) -> None:
        if self._waiting_to_send and sock is not None:
            self._loop.remove_writer(sock.fileno())
        self._waiting_to_send = False
        for _data, fds in self._outbox:
            for fd in fds:
                os.close(fd)
        self._outbox.clear()


def _kill(pid: int) -> str | None:
    """SIGKILL the helper and reap it; how it ended. A process held in the kernel (an
    uninterruptible write to a stuck disk) is reaped by a thread of its own, not here on
    the loop."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    status = _reap(pid, 1.0)
    if status is None:
        log.error("ingest_process_stuck", pid=pid, hint="reaped once the kernel lets it go")
        threading.Thread(target=_reap, args=(pid, None), daemon=True).start()
    return status


def _dup_all(fds: list[int]) -> tuple[int, ...]:
    """Copies of ``fds``; none left open if one cannot be made."""
    copies: list[int] = []
    try:
        for fd in fds:
            copies.append(os.dup(fd))
    except OSError:
        for fd in copies:
            os.close(fd)
        raise
    return tuple(copies)


def _reap(pid: int, timeout: float | None) -> str | None:
    """Wait for the helper (at most ``timeout`` seconds); how it ended, or None if it has
    not."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG if deadline is not None else 0)
        if done:
            if os.WIFSIGNALED(status):
                return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
            return f"exit status {os.waitstatus_to_exitcode(status)}"
        if deadline is None or time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _chain(source: asyncio.Future[None], target: asyncio.Future[None]) -> None:
    def done(_: asyncio.Future[None]) -> None:
        if not target.done():
            target.set_result(None)

    source.add_done_callback(done)

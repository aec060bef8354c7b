"""The ingest helper process: reads the jobs' pipes into their spools beside the server.

The server's side, and why ingestion runs in a process of its own, is
:mod:`jobworker.backends.local.ingest_process`; this is the other end of its socket: an
event loop taking the server's messages (``job``, ``drop``, ``forget``) and the ingest
threads reporting each spool write (``state``) and each closed pipe (``eof``). The message
framing both ends use is here too.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import functools
import json
import os
import signal
import socket
from typing import Any

import attrs

from jobworker.backends.local.ingest import Ingest, Pipe
from jobworker.backends.local.outputlog import SpoolBudget, SpoolWriter
from jobworker.model import Stream

#: Bytes of one message, at most (a state carries at most a few hundred marks).
MESSAGE_MAX = 1 << 20
#: Descriptors one message carries, at most (a job's spool file and its two pipes).
FDS_MAX = 3


def send_message(sock: socket.socket, data: bytes, fds: tuple[int, ...], flags: int) -> None:
    """One message with ``fds`` (``socket.send_fds`` of Python 3.11 ignores ``flags``)."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary, flags)


def receive_message(sock: socket.socket, flags: int) -> tuple[bytes, list[int]]:
    """One message and the descriptors it carries, close-on-exec (``socket.recv_fds`` of
    Python 3.11 ignores ``flags``)."""
    fds = array.array("i")
    data, ancillary, _flags, _addr = sock.recvmsg(
        MESSAGE_MAX, socket.CMSG_LEN(FDS_MAX * fds.itemsize), flags | socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


@attrs.define(eq=False)
class _Log:
    writer: SpoolWriter
    fd: int
    pipes: set[int] = attrs.Factory(set)
    forgotten: bool = False


class _Helper:
    """The helper's side: an event loop for the server's messages, the ingest threads for
    the pipes."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        read_size: int,
        budget: SpoolBudget,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._budget = budget
        # At the server's own priority: here, with a GIL of their own, the threads no
        # longer wait for the loop, and at nice -20 a busy helper starved the server's loop
        # on a slow machine (GetStatus p99 over 1 s in the VM; docs/performance.md).
        self._ingest = Ingest(loop, read_size, priority=None)
        self._logs: dict[str, _Log] = {}
        self._pipes: dict[int, Pipe] = {}
        self.finished: asyncio.Future[None] = loop.create_future()

    def receive(self) -> None:
        while True:
            try:
                data, fds = receive_message(self._sock, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except ConnectionError:
                data, fds = b"", []
            if not data:  # the server closed its end: every job has ended, or it died
                if not self.finished.done():
                    self.finished.set_result(None)
                return
            self._serve(json.loads(data), fds)

    def _serve(self, message: dict[str, Any], fds: list[int]) -> None:
        kind = message["t"]
        if kind == "job":  # fds: the spool file, then each pipe
            log_id = message["log"]
            entry = _Log(SpoolWriter(fds[0], message["max"], self._budget), fds[0])
            self._logs[log_id] = entry
            entry.pipes.update(pipe_id for pipe_id, _ in message["pipes"])
            for (pipe_id, stream), fd in zip(message["pipes"], fds[1:], strict=True):
                self._pipes[pipe_id] = self._ingest.add(
                    fd,
                    functools.partial(self._write, log_id, entry.writer, Stream(stream)),
                    functools.partial(self._eof, log_id, pipe_id),
                )
        elif kind == "drop":
            pipe = self._pipes.get(message["pipe"])
            if pipe is not None:
                self._ingest.drop(pipe)
        elif kind == "forget":
            entry_or_none = self._logs.get(message["log"])
            if entry_or_none is None:  # a log of a helper before this one
                self._budget.give_back(message["charged"])
                return
            entry_or_none.forgotten = True
            entry_or_none.writer.cut("the job's output was removed")
            for pipe_id in list(entry_or_none.pipes):
                self._ingest.drop(self._pipes[pipe_id])
            self._close_log(message["log"])

    def _write(self, log_id: str, writer: SpoolWriter, stream: Stream, data: bytes) -> None:
        """The spool-writing thread: write, then tell the server what the log holds."""
        writer.write(stream, data)
        state = attrs.asdict(writer.take())
        self.tell({"t": "state", "log": log_id, "state": state})

    def tell(self, message: dict[str, Any]) -> None:
        """Send to the server (either thread); if it is gone, the loop ends at end-of-file."""
        try:
            self._sock.sendall(json.dumps(message).encode())
        except OSError:
            pass

    def _eof(self, log_id: str, pipe_id: int) -> None:
        del self._pipes[pipe_id]
        self.tell({"t": "eof", "pipe": pipe_id})
        entry = self._logs[log_id]
        entry.pipes.discard(pipe_id)
        if not entry.pipes:
            self._close_log(log_id)

    def _close_log(self, log_id: str) -> None:
        """Once its pipes are closed (none is written any more), the spool's descriptor
        goes; the budget it charged stays until the server removes the log."""
        entry = self._logs[log_id]
        if entry.pipes:
            return
        if entry.fd >= 0:
            os.close(entry.fd)
            entry.fd = -1
        if entry.forgotten:
            entry.writer.give_back()
            del self._logs[log_id]

    def close(self) -> None:
        self._ingest.close()


def main(argv: list[str]) -> None:
    """The helper: ``READ_SIZE SPOOL_USED [SPOOL_LIMIT]``, its socket on fd 3."""
    from jobworker.logconfig import configure_logging

    p = argparse.ArgumentParser(prog="jobworker-ingest")
    p.add_argument("read_size", type=int)
    p.add_argument("spool_used", type=int)
    p.add_argument("spool_limit", type=int, nargs="?")
    options = p.parse_args(argv)
    configure_logging()
    # The server decides when ingestion ends (it closes the socket once every job has
    # ended): a SIGTERM to the whole service (systemd's stop) must not cut the output of
    # jobs the server is still stopping.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    # Blocking: the spool-writing thread's reports wait while the server's queue is full
    # (the loop receives with MSG_DONTWAIT).
    sock = socket.socket(fileno=3)
    budget = SpoolBudget(options.spool_limit)
    budget.take(options.spool_used)
    asyncio.run(_run(sock, options.read_size, budget))


async def _run(sock: socket.socket, read_size: int, budget: SpoolBudget) -> None:
    loop = asyncio.get_running_loop()
    helper = _Helper(loop, sock, read_size, budget)
    loop.add_reader(sock.fileno(), helper.receive)
    helper.tell({"t": "ready"})
    try:
        await helper.finished
    finally:
        loop.remove_reader(sock.fileno())
        helper.close()
        sock.close()

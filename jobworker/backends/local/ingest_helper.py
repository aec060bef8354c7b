"""The ingest helper process: reads the jobs' pipes into their spools beside the server.

The server's side, and why ingestion runs in a process of its own, is
:mod:`jobworker.backends.local.ingest_process`; this is the other end of its socket: an
event loop taking the server's messages (``job``, ``drop``, ``forget``) and the ingest
threads reporting each spool write (``state``) and each closed pipe (``eof``). The message
framing both ends use is here too.

**Live restore** (``serve --live-restore``, the helper started with ``--live RUN_DIR``).
When its server goes (it stops, or dies), the helper stays: it keeps reading every job's
pipes into their spools, so a job never blocks on a full pipe nor loses a byte while no
server runs, and it answers on its socket in the run directory (``ingest-<pid>.sock``,
listening from its start, so that a next server however quick finds it). The next
server connects and sends ``handover``: the helper stops reading every pipe once what it
read is spooled, sends, per log, ``log`` (the bytes the job wrote and why the log was cut,
which its spool cannot tell) with the pipes not at their end and the job's stdin if it is
still open (their descriptors: the helper holds a copy of each stdin it is given, so that
the job does not read end-of-file while no server runs), then ``done``, and exits. The
new server's own helper reads on from where it stopped (``job`` with the log's
``state``). Only a peer of the helper's own uid is served.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import structlog

from jobworker.backends.local.ingest import Ingest, Pipe
from jobworker.backends.local.spoolwriter import SpoolBudget, SpoolState, SpoolWriter
from jobworker.model import Stream

log = structlog.get_logger("jobworker.backends.local.ingest_helper")

#: Bytes of one message, at most (a state carries at most a few hundred marks).
MESSAGE_MAX = 1 << 20
#: Descriptors one message carries, at most (a job's spool file, its two output pipes and
#: its stdin).
FDS_MAX = 4
#: How the socket a helper listens on for the next server (live restore) is named, in the
#: live run directory: the prefix, then the helper's pid, then the suffix.
HANDOVER_PREFIX, HANDOVER_SUFFIX = "ingest-", ".sock"


def handover_socket_name(pid: int) -> str:
    return f"{HANDOVER_PREFIX}{pid}{HANDOVER_SUFFIX}"


def handover_socket_pid(name: str) -> int | None:
    """The pid in a hand-over socket's name; None for any other name."""
    number = name.removeprefix(HANDOVER_PREFIX).removesuffix(HANDOVER_SUFFIX)
    framed = name.startswith(HANDOVER_PREFIX) and name.endswith(HANDOVER_SUFFIX)
    return int(number) if framed and number.isdigit() else None


def run_dir_path(directory_fd: int, name: str) -> str:
    """``name`` in the directory open as ``directory_fd``, as a socket address: a unix
    socket's path is limited to 108 bytes, a spool directory's is not."""
    return f"/proc/self/fd/{directory_fd}/{name}"


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


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
    #: Live restore: a copy of the write end of the job's stdin, held (never written) so
    #: that the job does not read end-of-file when its server goes; -1: none.
    stdin: int = -1

    def close_stdin(self) -> None:
        if self.stdin >= 0:
            os.close(self.stdin)
            self.stdin = -1


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
        #: Each pipe's log and stream (for a hand-over).
        self._pipe_of: dict[int, tuple[str, Stream]] = {}
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
        if kind == "job":  # fds: the spool file, each pipe, then the stdin it holds
            log_id = message["log"]
            account = self._budget.account(message["owner"])
            entry = _Log(SpoolWriter(fds[0], message["max"], account), fds[0])
            if message.get("stdin"):
                entry.stdin = fds.pop()
            if "state" in message:  # a log an earlier helper wrote: go on where it stopped
                entry.writer.resume(SpoolState(**{**message["state"], "marks": ()}))
            self._logs[log_id] = entry
            entry.pipes.update(pipe_id for pipe_id, _ in message["pipes"])
            for (pipe_id, stream), fd in zip(message["pipes"], fds[1:], strict=True):
                self._pipe_of[pipe_id] = (log_id, Stream(stream))
                self._pipes[pipe_id] = self._ingest.add(
                    fd,
                    functools.partial(self._write, log_id, entry.writer, Stream(stream)),
                    functools.partial(self._eof, log_id, pipe_id),
                )
        elif kind == "stdin_closed":
            held = self._logs.get(message["log"])
            if held is not None:
                held.close_stdin()
        elif kind == "drop":
            pipe = self._pipes.get(message["pipe"])
            if pipe is not None:
                self._ingest.drop(pipe)
        elif kind == "forget":
            entry_or_none = self._logs.get(message["log"])
            if entry_or_none is None:  # a log of a helper before this one
                self._budget.give_back(message["owner"], message["charged"])
                return
            entry_or_none.forgotten = True
            entry_or_none.close_stdin()
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

    async def hand_over(self, peer: socket.socket) -> None:
        """Give every log to the next server (see the module docstring)."""
        pipes = dict(self._pipes)
        await asyncio.gather(*(self._ingest.drop(pipe, keep=True) for pipe in pipes.values()))
        kept: dict[str, list[tuple[Stream, int]]] = {}
        for pipe_id, pipe in pipes.items():
            log_id, stream = self._pipe_of[pipe_id]
            if pipe.keep:
                kept.setdefault(log_id, []).append((stream, pipe.fd))
        for log_id, entry in self._logs.items():
            if entry.forgotten:
                continue
            state = entry.writer.take()
            streams = kept.get(log_id, [])
            message = {
                "t": "log",
                "log": log_id,
                "seen": state.seen,
                "cut": state.cut,
                "streams": [int(stream) for stream, _ in streams],
                "stdin": entry.stdin >= 0,
            }
            fds = tuple(fd for _, fd in streams) + ((entry.stdin,) if entry.stdin >= 0 else ())
            send_message(peer, json.dumps(message).encode(), fds, 0)
            for fd in fds:
                os.close(fd)
            entry.stdin = -1
        send_message(peer, b'{"t": "done"}', (), 0)
        log.info("ingest_handed_over", logs=len(self._logs), pipes=len(pipes))

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
    """The helper: ``[--live RUN_DIR] [--per-client BYTES] READ_SIZE SPOOL_USED
    [SPOOL_LIMIT]``, its socket on fd 3; SPOOL_USED is what each client's logs already
    hold, as JSON."""
    from jobworker.logconfig import configure_logging

    p = argparse.ArgumentParser(prog="jobworker-ingest")
    p.add_argument("read_size", type=int)
    p.add_argument("spool_used", type=json.loads)
    p.add_argument("spool_limit", type=int, nargs="?")
    p.add_argument("--per-client", type=int, metavar="BYTES")
    p.add_argument("--live", type=Path, metavar="RUN_DIR")
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
    budget = SpoolBudget(options.spool_limit, options.per_client)
    for owner, used in options.spool_used.items():
        budget.take(owner, used, force=True)
    asyncio.run(_run(sock, options.read_size, budget, options.live))


async def _run(sock: socket.socket, read_size: int, budget: SpoolBudget, live: Path | None) -> None:
    loop = asyncio.get_running_loop()
    helper = _Helper(loop, sock, read_size, budget)
    with contextlib.ExitStack() as stack:
        # Listening from the start, so a next server that comes however soon finds it; it
        # is answered once this helper has seen its own server go.
        listener = None if live is None else stack.enter_context(_handover_socket(live))
        loop.add_reader(sock.fileno(), helper.receive)
        helper.tell({"t": "ready"})
        try:
            await helper.finished
            loop.remove_reader(sock.fileno())
            if listener is not None:
                # Reports to the server that is gone fail (EPIPE) and are dropped meanwhile.
                log.info("ingest_waiting_for_server", run_dir=str(live))
                await _wait_for_next_server(helper, listener)
        finally:
            helper.close()
            sock.close()


@contextlib.contextmanager
def _handover_socket(run_dir: Path) -> Iterator[socket.socket]:
    """This helper's listening socket in ``run_dir``, removed when it exits."""
    directory = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    address = run_dir_path(directory, handover_socket_name(os.getpid()))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)  # a helper of this pid before the reboot
        listener.bind(address)
        listener.listen(4)
        listener.setblocking(False)
        yield listener
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        os.close(directory)


async def _wait_for_next_server(helper: _Helper, listener: socket.socket) -> None:
    """Until a server of this uid asks for the hand-over; then do it."""
    loop = asyncio.get_running_loop()
    while True:
        peer, _ = await loop.sock_accept(listener)
        with peer:
            if peer_uid(peer) != os.getuid():
                continue
            request = await loop.sock_recv(peer, 64)
            if request != b'{"t": "handover"}':
                continue
            peer.setblocking(True)
            await helper.hand_over(peer)
            return

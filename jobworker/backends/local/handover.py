"""Live restore's hand-over, the new server's side: the jobs' pipes taken back from the
ingest process a previous server left running (its side is ``hand_over`` in
:mod:`jobworker.backends.local.ingest_helper`; docs/upgrading.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import attrs

from jobworker.backends.local.ingest_helper import (
    HANDOVER_SOCKET,
    receive_message,
    run_dir_path,
)
from jobworker.backends.local.spawn import resolve_future
from jobworker.model import Stream

#: How long the previous server's helper may take to spool what it read and hand over.
HANDOVER_TIMEOUT = 30.0


@attrs.frozen
class HandedOver:
    """One log as the previous server's helper left it: the bytes its job wrote, why it
    was cut, and its pipes that had not reached their end (this process owns them)."""

    seen: int
    cut: str | None
    pipes: tuple[tuple[Stream, int], ...]
    #: The write end of the job's stdin while it is open, else -1.
    stdin: int = -1

    def close(self) -> None:
        for fd in (*(fd for _stream, fd in self.pipes), self.stdin):
            if fd >= 0:
                os.close(fd)


async def take_over(run_dir: Path) -> dict[str, HandedOver] | None:
    """Every log of the helper a previous server left in ``run_dir`` (live restore), by
    id; None when no helper waits there (it died, or none was left)."""
    loop = asyncio.get_running_loop()
    directory = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    logs: dict[str, HandedOver] = {}
    try:
        try:
            await loop.sock_connect(sock, run_dir_path(directory, HANDOVER_SOCKET))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        await loop.sock_sendall(sock, b'{"t": "handover"}')
        async with asyncio.timeout(HANDOVER_TIMEOUT):
            while True:
                data, fds = await _receive_one(loop, sock)
                message: dict[str, Any] = json.loads(data) if data else {"t": "done"}
                if message["t"] == "done":
                    return logs
                stdin = fds.pop() if message.get("stdin") else -1
                streams = [Stream(stream) for stream in message["streams"]]
                pipes = tuple(zip(streams, fds, strict=True))
                logs[message["log"]] = HandedOver(message["seen"], message["cut"], pipes, stdin)
    except BaseException:
        for handed in logs.values():
            handed.close()
        raise
    finally:
        sock.close()
        os.close(directory)


async def _receive_one(
    loop: asyncio.AbstractEventLoop, sock: socket.socket
) -> tuple[bytes, list[int]]:
    while True:
        try:
            return receive_message(sock, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), resolve_future, ready)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())

"""Live restore's hand-over, the new server's side: the jobs' pipes taken back from the
ingest process a previous server left running (its side is ``hand_over`` in
:mod:`jobworker.backends.local.ingest_helper`; docs/upgrading.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import attrs

from jobworker.backends.local.ingest_helper import (
    handover_socket_pid,
    receive_message,
    run_dir_path,
)
from jobworker.backends.local.spawn import resolve_future
from jobworker.model import Stream

#: How long the previous server's helper may take to spool what it read and hand over.
HANDOVER_TIMEOUT = 30.0
#: The socket of the first version with live restore (1c2d5f3): bound once its server went.
FIRST_HANDOVER_SOCKET = "ingest.sock"


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


async def take_over(run_dir: Path, own_helper: int | None = None) -> dict[str, HandedOver] | None:
    """Every log of the helper a previous server left in ``run_dir`` (live restore), by
    id; None when no helper waits there (it died, or none was left). ``own_helper``: the
    pid of this server's own helper, whose socket is there too but is not for it."""
    directory = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in sorted(os.listdir(directory)):
            pid = handover_socket_pid(name)
            if name != FIRST_HANDOVER_SOCKET and (pid is None or pid == own_helper):
                continue
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with sock:
                sock.setblocking(False)
                address = run_dir_path(directory, name)
                try:
                    await asyncio.get_running_loop().sock_connect(sock, address)
                except ConnectionRefusedError:  # a helper that died: nobody listens
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(address)
                    continue
                except FileNotFoundError:
                    continue
                return await _take(sock)
        return None
    finally:
        os.close(directory)


async def _take(sock: socket.socket) -> dict[str, HandedOver]:
    loop = asyncio.get_running_loop()
    logs: dict[str, HandedOver] = {}
    try:
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

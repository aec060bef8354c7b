"""The server's open-file limit: raised to the hard limit, connections fitted beside the
jobs' reserve, and a low limit never stops the server from starting."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import textwrap

import pytest

from jobworker.api.connections import (
    GATE_IDLE_PERIOD,
    GATE_PERIOD,
    Connection,
    ConnectionLimits,
    PeerGate,
    surplus,
)
from jobworker.errors import ConfigError

PROBE = textwrap.dedent(
    """
    import resource, sys
    from jobworker.api.connections import ConnectionLimits, raise_file_limit
    hard = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    limits = raise_file_limit(ConnectionLimits(), int(sys.argv[2]))
    print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], limits.max_connections)
    """
)


@pytest.mark.parametrize(
    ("hard", "max_jobs", "expected"),
    [
        (20000, 1000, "20000 1024"),  # room for all: the default stands
        (4096, 100, "4096 1024"),  # 256 + 8 x 100 kept for jobs, 3040 left
        (4096, 1000, "4096 1024"),  # jobs' reserve above the limit: a quarter of it
        (1024, 1000, "1024 256"),
    ],
)
def test_the_file_limit_is_raised_and_connections_fit(
    hard: int, max_jobs: int, expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(hard), str(max_jobs)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines()[-1] == expected  # after the log lines


def test_a_peer_cap_above_the_total_is_refused() -> None:
    with pytest.raises(ConfigError, match="--max-connections-per-peer must be at least 1"):
        ConnectionLimits(max_connections=10, max_connections_per_peer=11)


def test_the_surplus_is_each_addresses_newest_unauthenticated() -> None:
    held = [Connection("10.0.0.1", port, inode) for inode, port in enumerate(range(1000, 1005))]
    other = [Connection("10.0.0.2", 2000, 99)]
    spared = {("10.0.0.1", 1004)}  # the newest, but it carried an authenticated RPC
    cut = surplus(held + other, 2, spared)
    assert [c.port for c in cut] == [1002, 1003]


def test_the_gate_lists_connections_only_when_a_socket_is_new() -> None:
    """An idle server's gate costs a look at its descriptors, not a walk of the kernel's
    TCP table; a new connection (a new socket) makes the next pass list, and a peer's
    surplus is shut down."""

    async def scenario() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            port = listener.getsockname()[1]
            gate = PeerGate(per_peer=2)
            gate.start(port)
            await gate.stop()  # passes are driven by hand below
            await gate.enforce()
            # Nothing new: no listing. (Another test's leftover thread in this process may
            # open a socket meanwhile, which rightly makes a pass list: a few tries.)
            for _ in range(20):
                listed = gate._passes
                assert await gate.enforce() == 0
                if gate._passes == listed:
                    break
            assert gate._passes == listed, "nothing new, yet the connections were listed"
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
            accepted = [listener.accept()[0] for _ in clients]
            try:
                assert await gate.enforce() == 1  # the newest of three from one address
                assert gate._passes == listed + 1
                assert clients[2].recv(1) == b""  # its server side was shut down
            finally:
                for sock in clients + accepted:
                    sock.close()

    asyncio.run(scenario())


class _CountedGate(PeerGate):
    """A gate that counts its passes."""

    passes = 0

    async def enforce(self) -> int:
        self.passes += 1
        return await super().enforce()


def test_an_idle_gate_slows_to_once_a_second_and_a_new_socket_speeds_it_up() -> None:
    """An idle server's wake-ups are most of its idle CPU: with no new socket the pause
    grows from GATE_PERIOD to GATE_IDLE_PERIOD; a new one brings GATE_PERIOD back."""
    assert GATE_IDLE_PERIOD == 4 * GATE_PERIOD  # the counts below assume 0.25, 0.5, 1 s

    async def scenario() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            gate = _CountedGate(per_peer=2)
            gate.start(listener.getsockname()[1])
            try:
                await asyncio.sleep(3.0)
                assert gate.passes <= 6, gate.passes  # every 0.25 s would be 12
                # Sockets keep arriving (as a flood's connections would): a pass every
                # 0.25 s once the first is seen (every 1 s would be 2 or 3 passes).
                before = gate.passes
                with contextlib.ExitStack() as arriving:
                    for _ in range(25):
                        arriving.enter_context(socket.socket())
                        await asyncio.sleep(0.1)
                assert gate.passes - before >= 5, gate.passes - before
            finally:
                await gate.stop()

    asyncio.run(scenario())

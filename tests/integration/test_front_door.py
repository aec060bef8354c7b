"""Connections are bounded before authentication: a stranger's flood of TCP connections
neither starves an authenticated client nor makes it blame its certificate."""

from __future__ import annotations

import collections
import contextlib
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from jobworker import errors
from jobworker.api.connections import ConnectionLimits, established
from jobworker.api.pki import PkiPaths
from jobworker.client import JobClient
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.serverfixtures import RunningServer, client_credentials, running_server

#: Bounds of the waits below: what should take a fraction of a second, given the slack a
#: shared machine needs. Not timing targets (bench/bench_flood.py measures).
BOUND = 20.0
FLOODER = "127.0.0.2"


def _port(server: RunningServer) -> int:
    return int(server.address.rsplit(":", 1)[1])


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@contextlib.contextmanager
def _connections(port: int, count: int, source: str = FLOODER) -> Iterator[list[socket.socket]]:
    """``count`` plain TCP connections from ``source`` that send nothing; closed at exit."""
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            opened.append(sock)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _per_peer(port: int) -> collections.Counter[str]:
    return collections.Counter(c.peer for c in established(port))


def test_a_flood_from_one_address_leaves_room_for_everyone_else(
    api_pki: PkiPaths, tmp_path: Path
) -> None:
    limits = ConnectionLimits(max_connections=64, max_connections_per_peer=8)
    with running_server(api_pki, spool_dir=tmp_path / "spool", connections=limits) as server:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert soft == hard  # raised at start-up
        port = _port(server)
        with _connections(port, 200) as flood:
            # The gate trims the flooder to its share; grpc closes what is past the total.
            _wait(lambda: _per_peer(port)[FLOODER] <= 8, "the flood kept more than its share")
            _wait(lambda: sum(map(_closed_by_server, flood)) >= 192, "surplus left open")
            with JobClient(server.address, api_pki.client("alice")) as alice:
                assert alice.list() is not None


def test_a_silent_connection_is_closed_at_the_handshake_timeout(
    api_pki: PkiPaths, tmp_path: Path
) -> None:
    limits = ConnectionLimits(handshake_timeout=0.5)
    with (
        running_server(api_pki, spool_dir=tmp_path / "spool", connections=limits) as server,
        _connections(_port(server), 3) as silent,
    ):
        _wait(lambda: all(map(_closed_by_server, silent)), "a silent connection stayed")


def test_a_client_the_server_cannot_take_is_told_it_is_busy(
    api_pki: PkiPaths, tmp_path: Path
) -> None:
    limits = ConnectionLimits(max_connections=4, max_connections_per_peer=4, handshake_timeout=60)
    with running_server(api_pki, spool_dir=tmp_path / "spool", connections=limits) as server:
        port = _port(server)
        with _connections(port, 4):
            _wait(lambda: _per_peer(port)[FLOODER] == 4, "the 4 connections were not taken")
            with (
                JobClient(server.address, api_pki.client("alice")) as alice,
                pytest.raises(errors.Unavailable) as refused,
            ):
                alice.list()
        message = str(refused.value)
        assert f"the server at {server.address} is busy" in message
        assert "certificate" not in message
        # Once the flood is gone (the server's side of its connections closed too: the
        # client's close reaches it a moment later), the same client is served.
        _wait(lambda: _per_peer(port)[FLOODER] == 0, "the flood's connections stayed")
        with JobClient(server.address, api_pki.client("alice")) as alice:
            assert alice.list() is not None


def test_a_stream_outlives_its_connection_age_and_new_rpcs_reconnect(
    api_pki: PkiPaths, tmp_path: Path
) -> None:
    limits = ConnectionLimits(max_connection_age=0.5)
    with (
        running_server(api_pki, spool_dir=tmp_path / "spool", connections=limits) as server,
        JobClient(server.address, api_pki.client("alice")) as alice,
    ):
        job_id = alice.start("sh", ["-c", "for i in $(seq 30); do echo $i; sleep 0.1; done"])
        output = b"".join(data for _stream, data, _offset in alice.stream(job_id))
        assert output == b"".join(b"%d\n" % i for i in range(1, 31))
        assert alice.status(job_id).exit_code == 0  # a new RPC, past the age: served


def test_the_per_address_cap_spares_connections_that_authenticated(
    api_pki: PkiPaths, tmp_path: Path
) -> None:
    limits = ConnectionLimits(max_connections=64, max_connections_per_peer=4)
    with running_server(api_pki, spool_dir=tmp_path / "spool", connections=limits) as server:
        port = _port(server)
        # Ten connections of one client, each with an RPC done, from the flood's address.
        credentials = client_credentials(api_pki.client("alice"))
        channels = [
            grpc.secure_channel(
                server.address, credentials, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(10)
        ]
        try:
            for channel in channels:
                pb_grpc.JobServiceStub(channel).ListJobs(pb.ListJobsRequest(), timeout=BOUND)
            with _connections(port, 30, source="127.0.0.1") as flood:
                _wait(lambda: sum(map(_closed_by_server, flood)) >= 26, "surplus left open")
                assert _per_peer(port)["127.0.0.1"] == 10 + 4  # all of alice's are kept
            for channel in channels:
                assert channel._channel.check_connectivity_state(False) == 2  # READY, never cut
        finally:
            for channel in channels:
                channel.close()

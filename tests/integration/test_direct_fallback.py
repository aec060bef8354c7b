"""A client redirected to a job's node that it cannot reach, or whose certificate is not
the one the redirect named, reads the output through the server instead: every byte, and
the job's end.

The server here stands in for a cluster's front (the redirect is its answer to test: the
Ray tests, tests/ray_cluster/test_cluster_direct.py, redirect for real); the client, its
TLS and the sockets are real."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from jobworker.api import codec
from jobworker.api.pki import PkiPaths
from jobworker.client import JobClient
from jobworker.model import OutputChunk, Stream
from jobworker.v1 import jobworker_pb2 as pb
from tests.serverfixtures import make_api_pki

pytestmark = pytest.mark.timeout(60)

DATA = bytes(range(256)) * 4096  # 1 MiB
#: A certificate no port here presents.
FOREIGN_CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


class StandInFront:
    """StreamOutput as a cluster's front answers it: a redirect to ``node`` when asked
    ``direct_ok``, else the output (from the offset asked) and, asked so, the job's end."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.requests: list[pb.JobRequest] = []

    def stream(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        request = pb.JobRequest.FromString(raw)
        self.requests.append(request)
        if request.direct_ok:
            redirect = codec.Redirect(self.node, FOREIGN_CERT, "jobworker-agent", "t" * 43, 30.0)
            yield codec.encode_redirect(redirect)
            return
        for at in range(request.offset, len(DATA), 65536):
            piece = DATA[at : at + 65536]
            yield codec.encode_chunk(OutputChunk(Stream.STDOUT, piece, at + len(piece)))
        if request.with_status:
            end = pb.JobStatusResponse(job_id="j", status="exited", reason="exited", exit_code=3)
            yield pb.JobOutputChunk(offset=len(DATA), status=end).SerializeToString()


def _serve(pki: PkiPaths, front: StandInFront) -> tuple[grpc.Server, str]:
    files = pki.server()
    credentials = grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=files.ca.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(ThreadPoolExecutor(4))
    handler = grpc.unary_stream_rpc_method_handler(front.stream)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "jobworker.v1.JobService", {"StreamOutput": handler}
            ),
        )
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return make_api_pki(tmp_path / "pki")


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("node", ["nobody listens", "another certificate"])
def test_an_unreachable_node_falls_back_to_the_server(pki: PkiPaths, node: str) -> None:
    other = None
    if node == "nobody listens":
        address = _closed_port()
    else:  # a TLS port whose certificate is not the redirect's: the handshake fails
        other, address = _serve(pki, StandInFront(""))
    front = StandInFront(address)
    server, front_address = _serve(pki, front)
    try:
        with JobClient(front_address, pki.client("alice")) as client:
            chunks = client.follow_to_end("j")
            got = b""
            while True:
                try:
                    _, data, _ = next(chunks)
                except StopIteration as stop:
                    end = stop.value
                    break
                got += bytes(data)
        assert got == DATA
        assert (end.state, end.exit_code) == ("exited", 3)
        # Asked direct first; then through the server, from the start, with the end.
        asked = [(r.direct_ok, r.offset, r.with_status) for r in front.requests]
        assert asked == [(True, 0, True), (False, 0, True)]
    finally:
        server.stop(None)
        if other is not None:
            other.stop(None)


def test_a_client_that_does_not_ask_is_not_redirected(pki: PkiPaths) -> None:
    front = StandInFront(_closed_port())
    server, address = _serve(pki, front)
    try:
        with JobClient(address, pki.client("alice"), direct_output=False) as client:
            assert b"".join(bytes(d) for _, d, _ in client.stream_views("j", 1000)) == DATA[1000:]
        assert [r.direct_ok for r in front.requests] == [False]
    finally:
        server.stop(None)

"""Reusable TLS test helpers: a dev PKI with extra certificates, and a small mTLS server.

The server is a real grpc server on 127.0.0.1 (ephemeral port) built with
``server_credentials``. It serves the standard health service and ``WHOAMI``, a bytes-in,
bytes-out method that runs ``check_peer`` and answers with the caller's identity as JSON,
or aborts with UNAUTHENTICATED and the check's message.

grpc must be imported after ``jobworker.api.tls`` in the test process (tests/integration/
conftest.py sees to it), otherwise ``server_credentials`` refuses to build credentials.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from jobworker.api.pki import CertAuthority, PkiPaths, init_pki, issue_client_cert
from jobworker.api.tls import RevocationList, check_peer, server_credentials
from jobworker.api.tlsfiles import TlsFiles
from jobworker.errors import Unauthenticated

WHOAMI = "/jobworker.test.Probe/WhoAmI"
RPC_TIMEOUT_S = 5.0


def make_test_pki(directory: Path) -> PkiPaths:
    """A dev PKI with ``alice`` (user) and ``admin`` (admin) clients."""
    return init_pki(directory, clients=[("alice", "user"), ("admin", "admin")])


def add_client(
    paths: PkiPaths,
    name: str,
    *,
    ca: CertAuthority | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> TlsFiles:
    """Issue and write a client certificate, by the PKI's CA unless ``ca`` is given.

    The returned files verify the server with the PKI's CA whichever CA signed the client.
    """
    issued = issue_client_cert(
        ca or paths.load_ca(), name, not_before=not_before, not_after=not_after
    )
    issued.write(paths.client_cert(name), paths.client_key(name))
    return paths.client(name)


def _whoami_handler(crl: RevocationList | None) -> grpc.GenericRpcHandler:
    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            identity = check_peer(context.auth_context(), crl)
        except Unauthenticated as err:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
        return json.dumps(attrs.asdict(identity)).encode()

    return grpc.method_handlers_generic_handler(
        "jobworker.test.Probe", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
    )


@contextmanager
def identity_server(files: TlsFiles, crl: RevocationList | None = None) -> Iterator[int]:
    """Run the test server until the block exits; yields its port on 127.0.0.1."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        server = grpc.server(pool, handlers=[_whoami_handler(crl)])
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(files))
        assert port, "could not listen on 127.0.0.1"
        server.start()
        try:
            yield port
        finally:
            server.stop(None).wait()


def raw_channel_credentials(files: TlsFiles, *, with_client_cert: bool = True) -> Any:
    """Client credentials without ``channel_credentials``' own checks, to show that the
    server refuses what the client would not have sent."""
    if not with_client_cert:
        return grpc.ssl_channel_credentials(root_certificates=files.ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca.read_bytes(),
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )


def whoami(port: int, credentials: Any) -> dict[str, Any]:
    """Call WHOAMI over mTLS; raises ``grpc.RpcError`` when refused."""
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        answer = channel.unary_unary(WHOAMI)(b"", timeout=RPC_TIMEOUT_S)
    result: dict[str, Any] = json.loads(answer)
    return result


def health_check(channel: grpc.Channel) -> int:
    """The serving status the health service reports; raises ``grpc.RpcError`` when refused."""
    stub = health_pb2_grpc.HealthStub(channel)
    status: int = stub.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S).status
    return status

"""The agent's side of a node's output port (:mod:`.outputport` tells the whole design):
a grpc.aio server on the agent's event loop that serves the node's jobs' output to the
front servers it pinned, and to clients holding a ticket a front had it make ("Direct
output")."""

from __future__ import annotations

# First: grpc reads how to refuse TLS 1.2 once, when it is imported.
from jobworker.api.grpcenv import grpc  # isort: split

import asyncio
import collections
import hashlib
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable

import attrs
import structlog
from cryptography.x509.oid import ExtendedKeyUsageOID

from jobworker.api.codec import Redirect, encode_chunk
from jobworker.api.connections import ConnectionLimits
from jobworker.api.direct import TICKET_METADATA
from jobworker.backends.ray.outputport import (
    AGENT_NAME,
    KEEPALIVE_MS,
    SERVICE,
    PortInfo,
    SelfSigned,
    TicketGrant,
    fingerprint,
)
from jobworker.errors import (
    JobworkerError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    wire_code,
)
from jobworker.model import OutputChunk
from jobworker.v1 import jobworker_pb2 as pb

log = structlog.get_logger("jobworker.ray.outputport")

#: Fronts whose certificates an agent keeps pinned; the oldest is dropped beyond that (its
#: handshake then fails, and its followers ask the agent again, which pins it anew).
PINNED_FRONTS = 64
#: The public port's bounds on what a stranger's connection may hold (a handshake within
#: 5 s, at most 1024 connections, each at most 300 s old): anyone on the node's network can
#: reach the port, though only pinned fronts and certificates of a trusted client CA get
#: past the handshake. The agent lets the front ping every 10 s (grpc's default would
#: answer pings more frequent than every 5 minutes with GOAWAY).
_SERVER_OPTIONS = [
    *ConnectionLimits().grpc_options(),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
]
_TLS13 = b"TLSv1.3"
#: How long a ticket waits for its call (a redirected client connects at once).
TICKET_SECONDS = 30.0
#: Unspent tickets an agent keeps; beyond that the oldest lapses.
TICKETS_MAX = 4096
#: Client CAs an agent trusts at once (one per front deployment; the oldest is dropped).
CLIENT_CAS_MAX = 8


@attrs.frozen
class _Ticket:
    job_id: str
    #: SHA-256 of the client's certificate.
    holder: str
    client: str
    max_streams: int | None
    #: ``time.monotonic()`` after which it is void.
    expires: float


#: Output of a job on the agent's engine: ``(job_id, offset, follow)`` as
#: :meth:`JobManager.follow`.
Follow = Callable[[str, int, bool], AsyncIterator[OutputChunk]]


class AgentPort:
    """The agent's side: a grpc.aio server on the agent's event loop, started by the first
    front that asks (:meth:`open`)."""

    def __init__(self, host: str, follow: Follow) -> None:
        self._host = host
        self._follow = follow
        self._identity = SelfSigned.new(AGENT_NAME, ExtendedKeyUsageOID.SERVER_AUTH)
        #: Pinned fronts by fingerprint, oldest first.
        self._fronts: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        #: CAs of redirected clients, by fingerprint of their bytes, oldest first.
        self._client_cas: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        #: Unspent tickets, oldest first.
        self._tickets: collections.OrderedDict[str, _Ticket] = collections.OrderedDict()
        #: Open direct streams per client identity.
        self._direct: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._server: grpc.aio.Server | None = None
        self._address = ""
        self._starting = asyncio.Lock()

    async def open(self, front_cert: bytes) -> PortInfo:
        """Pin ``front_cert`` (a front's, handed over a Ray call) for the connections that
        follow; start the server on first use. Where to connect, and what to pin."""
        self._pin(front_cert)
        async with self._starting:  # two first callers (fronts, tickets): one server
            if self._server is None:
                await self._start()
        return PortInfo(self._address, self._identity.cert_pem)

    async def _start(self) -> None:
        credentials = grpc.dynamic_ssl_server_credentials(
            self._configuration(), self._fetch, require_client_authentication=True
        )
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        server.add_generic_rpc_handlers((self._handlers(),))
        port = server.add_secure_port(f"{self._host}:0", credentials)
        await server.start()
        self._server, self._address = server, f"{self._host}:{port}"
        log.info("output_port_listening", address=self._address)

    async def ticket(self, front_cert: bytes, grant: TicketGrant) -> Redirect:
        """A ticket for ``grant`` (a front that admitted the client asks, over Ray), with
        where to use it; the port starts, and trusts ``grant.client_ca``, if not yet."""
        info = await self.open(front_cert)
        self._trust(self._client_cas, hashlib.sha256(grant.client_ca).hexdigest(),
                    grant.client_ca, CLIENT_CAS_MAX, "output_port_client_ca_trusted")  # fmt: skip
        ticket = secrets.token_urlsafe(32)
        now = time.monotonic()
        while self._tickets and (
            len(self._tickets) >= TICKETS_MAX or next(iter(self._tickets.values())).expires < now
        ):
            self._tickets.popitem(last=False)
        self._tickets[ticket] = _Ticket(
            grant.job_id,
            fingerprint(grant.client_cert),
            grant.client,
            grant.max_streams,
            now + TICKET_SECONDS,
        )
        return Redirect(info.address, info.cert_pem, AGENT_NAME, ticket, TICKET_SECONDS)

    def _pin(self, cert_pem: bytes) -> None:
        self._trust(self._fronts, fingerprint(cert_pem), cert_pem, PINNED_FRONTS,
                    "output_port_front_pinned")  # fmt: skip

    def _trust(
        self,
        into: collections.OrderedDict[str, bytes],
        name: str,
        cert_pem: bytes,
        most: int,
        event: str,
    ) -> None:
        """Add ``cert_pem`` to the roots in ``into`` (at most ``most``, the oldest dropped);
        the next handshake uses the new roots."""
        with self._lock:
            known = name in into
            into[name] = cert_pem
            into.move_to_end(name)
            while len(into) > most:
                into.popitem(last=False)
            if not known and self._server is not None:
                self._pending = self._configuration()
        if not known:
            log.info(event, fingerprint=name)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        roots = b"".join([*self._fronts.values(), *self._client_cas.values()])
        return grpc.ssl_server_certificate_configuration(
            [(self._identity.key_pem, self._identity.cert_pem)], root_certificates=roots
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc asks before each handshake (on its own thread) whether the pins changed."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def _handlers(self) -> grpc.GenericRpcHandler:
        # Chunks leave encoded by hand (as the public service sends them): no serializer.
        stream = grpc.unary_stream_rpc_method_handler(
            self._stream_output, request_deserializer=pb.JobRequest.FromString
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"StreamOutput": stream})

    def _admit(self, context: grpc.aio.ServicerContext, job_id: str) -> _Ticket | None:
        """None for a pinned front; for a redirected client, its ticket (spent now)."""
        auth = context.auth_context()
        if tuple(auth.get("ssl_tls_version", ())) != (_TLS13,):
            raise Unauthenticated("the node's output port takes TLS 1.3 only")
        certs = auth.get("x509_pem_cert", ())
        if not certs:
            raise Unauthenticated("the node's output port needs a client certificate")
        holder = fingerprint(certs[0])
        if holder in self._fronts:
            return None
        given = dict(context.invocation_metadata() or ()).get(TICKET_METADATA)
        if not isinstance(given, str):
            given = ""
        ticket = self._tickets.get(given)
        if ticket is None or ticket.expires < time.monotonic():
            raise Unauthenticated(
                "the node's output port serves a client only with an unspent ticket from a"
                " front server: ask a front server for the job's output again"
            )
        if ticket.holder != holder or ticket.job_id != job_id:
            raise PermissionDenied("this ticket is for another job or another certificate")
        del self._tickets[given]
        if ticket.max_streams is not None and self._direct[ticket.client] >= ticket.max_streams:
            raise ResourceExhausted(
                f"{ticket.client} has {self._direct[ticket.client]} output streams open on"
                f" this node, the most the server allows one client; close some"
            )
        return ticket

    async def _stream_output(
        self, request: pb.JobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        client = ""
        try:
            ticket = self._admit(context, request.job_id)
            if ticket is not None:
                client = ticket.client
                self._direct[client] += 1
            chunks = self._follow(request.job_id, request.offset, not request.no_follow)
            async for chunk in chunks:
                yield encode_chunk(chunk)
        except JobworkerError as err:
            code = grpc.StatusCode[wire_code(err) or "INTERNAL"]
            if isinstance(err, Unauthenticated | PermissionDenied):
                log.warning("output_port_refused", peer=context.peer(), reason=str(err))
            await context.abort(code, str(err))
        finally:
            if client:
                self._direct[client] -= 1
                if not self._direct[client]:
                    del self._direct[client]

"""Job output over each node agent's own gRPC port, instead of through Ray's object store.

A Ray actor call's result travels through the node's object store and the front's, which
held a followed stream to 20-35% of a local one. So each agent serves its jobs' output
on a port of its own (:mod:`.agentport`; ``NodeOutput`` in proto/jobworker/v1/node.proto:
the public ``JobRequest`` and ``JobOutputChunk``, the same offsets), and the front
relays it (:class:`PortClient`, here).

Who may connect is settled over Ray's own token-authenticated actor calls, the channel
both ends already trust: every agent and every front makes a fresh key pair and a
self-signed certificate when it starts (:class:`SelfSigned`, in memory only), and the
front's first call for a node's output (``AgentPort.open``) hands the agent the front's
certificate and gets the agent's back. Each end then pins the other's: the agent's
server takes only the certificates of the fronts that asked as client roots
(``require_client_auth``; a peer with any other certificate, or none, fails the
handshake), and the front's channel takes only that agent's certificate as its root, with
the name in it as the target name. Jobs are never given either key. Each RPC is checked
again on the agent: TLS 1.3 and a pinned front's certificate.

The port listens on the address Ray announces for the node (its private address), never
on every address; a job's private network is denied the node's own addresses (see
docs/cluster.md), so a job on the node cannot even reach it.

**Direct output.** A relay costs the front about what the agent spends sending, which on
a small host held one follower to about half a local stream. So a client that says it can
reach nodes (``JobRequest.direct_ok``) is redirected to the port instead: the front,
having admitted it as for any stream, has the agent issue a **ticket** over Ray
(``AgentPort.ticket``, :class:`TicketGrant`) bound to the job and to the SHA-256 of the
client's certificate, good for one call within 30 s, and hands it over with the port's
address and certificate (``OutputRedirect``). The port then also takes client
certificates that chain to the fronts' CA (handed over with the ticket), and serves a
call that presents a valid ticket from the certificate it names, for the job it names;
with any other certificate, or none, or a ticket spent, expired, or for another job or
certificate, the call is refused. The client's identity was checked by the front
(whitelist, revocation, authorization) moments before; the ticket carries its per-client
stream bound, counted per node.
"""

from __future__ import annotations

# First: grpc reads how to refuse TLS 1.2 once, when it is imported.
from jobworker.api.grpcenv import grpc  # isort: split

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

import attrs
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.api.codec import Redirect, decode_chunk
from jobworker.backends.ray.nodes import RETRY_SECONDS, Node, Unreachable, call
from jobworker.errors import (
    FailedPrecondition,
    Unavailable,
    error_from_code,
)
from jobworker.model import JobStatus, OutputChunk, Stream
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import node_pb2

log = structlog.get_logger("jobworker.ray.outputport")

SERVICE = node_pb2.DESCRIPTOR.services_by_name["NodeOutput"].full_name
_STREAM_OUTPUT = f"/{SERVICE}/StreamOutput"
#: The name in every agent's certificate, which the front's channel expects (each agent is
#: told apart by its pinned certificate, not by a name).
AGENT_NAME = "jobworker-agent"
FRONT_NAME = "jobworker-front"
#: A certificate lives as long as its process; this only has to outlast that.
_VALIDITY = timedelta(days=3650)
_BACKDATE = timedelta(minutes=5)
#: The front pings a quiet connection (a job that writes nothing for a while) this often
#: and drops it when no answer comes within the timeout: a node that vanished without
#: closing its connections (power, network) ends its followers' streams, which then ask
#: the agent again and learn that the node is lost.
KEEPALIVE_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
_CHANNEL_OPTIONS = [
    ("grpc.ssl_target_name_override", AGENT_NAME),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
]
_STREAMS = {stream.label: stream for stream in Stream}


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER, in hex: how a pinned certificate is named."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


@attrs.frozen
class SelfSigned:
    """A fresh ECDSA P-256 key and a self-signed certificate for ``name``, kept in memory.

    Each one's subject is unique (``name`` and a random tag): an agent pins several
    fronts' certificates as roots, and a TLS library looks a root up by subject."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def new(cls, name: str, usage: x509.ObjectIdentifier) -> SelfSigned:
        key = ec.generate_private_key(ec.SECP256R1())
        unique = f"{name} {secrets.token_hex(8)}"
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, unique)])
        start = datetime.now(UTC) - _BACKDATE
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(cert.public_bytes(serialization.Encoding.PEM), key_pem)


@attrs.frozen
class PortInfo:
    """Where an agent's port is and the certificate it presents (what the front pins)."""

    address: str
    cert_pem: bytes


@attrs.frozen
class TicketGrant:
    """What a front asks an agent to let one client read (``AgentPort.ticket``)."""

    job_id: str
    #: The client's leaf certificate (PEM), whose fingerprint the ticket is bound to.
    client_cert: bytes
    #: The client's identity, for its stream bound.
    client: str
    #: Output streams one client may have open on this node (None: no bound).
    max_streams: int | None
    #: The CA the client's certificate chains to (the front's ``--tls-ca``, PEM).
    client_ca: bytes


class Job(Protocol):
    """What following a job needs of the front's :class:`.table.Job` (which this module
    cannot import: the table imports the agent, which imports this module)."""

    @property
    def status(self) -> JobStatus: ...
    @property
    def node(self) -> Node: ...
    @property
    def done(self) -> asyncio.Event: ...
    @property
    def output_lost(self) -> bool: ...


class PortClient:
    """The front's side: one channel per node's agent port, over which every follower of
    that node's jobs streams; made at the first follower, by asking the agent over Ray."""

    def __init__(self) -> None:
        self._identity = SelfSigned.new(FRONT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH)
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def channel(self, node: Node) -> grpc.aio.Channel:
        """The channel to ``node``'s agent port, pinning the agent's certificate (raises
        :class:`~.nodes.Unreachable` when the agent does not answer)."""
        known = self._channels.get(node.node_id)
        if known is not None:
            return known
        info: PortInfo = await call(node.agent.output_port.remote(self._identity.cert_pem), node)
        known = self._channels.get(node.node_id)  # another follower's ask came back first
        if known is not None:
            return known
        credentials = grpc.ssl_channel_credentials(
            root_certificates=info.cert_pem,
            private_key=self._identity.key_pem,
            certificate_chain=self._identity.cert_pem,
        )
        channel = grpc.aio.secure_channel(info.address, credentials, options=_CHANNEL_OPTIONS)
        self._channels[node.node_id] = channel
        return channel

    async def follow(
        self, job: Job, offset: int, follow: bool, stopping: Callable[[], bool]
    ) -> AsyncIterator[OutputChunk]:
        """``job``'s output from ``offset`` (see :meth:`RayBackend.follow`): a failed
        connection is tried again from the last offset, after asking the agent anew; a
        lost node ends it with FAILED_PRECONDITION, a front that is ``stopping`` with
        UNAVAILABLE and the offset to resume from."""
        job_id = job.status.job_id
        while True:
            try:
                channel = await self.channel(job.node)
            except Unreachable:
                channel = None
            if channel is not None:
                chunks = stream_output(channel, job_id, offset, follow)
                try:
                    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                        async for chunk in chunks:
                            yield chunk
                            offset = chunk.offset
                except PortUnavailable as err:
                    log.info("output_port_retry", node=job.node.name, job_id=job_id, error=str(err))
                    await self.forget(job.node, channel)
                else:
                    if follow:
                        # The end of a followed stream means the job is over: its status
                        # says so before the follower hears of the end (the agent's poll
                        # reports the exit at once).
                        await job.done.wait()
                    return
            if job.output_lost:
                raise output_lost(job, offset)
            if stopping():
                raise Unavailable(
                    f"the server is stopping; the job goes on: resume from offset {offset}"
                    " on another server of the cluster"
                )
            await asyncio.sleep(RETRY_SECONDS)

    async def forget(self, node: Node, channel: grpc.aio.Channel) -> None:
        """Drop ``node``'s ``channel`` after it failed: the next follower asks the agent
        again (a new agent has a new port and certificate; an agent may have dropped the
        front's pin). A newer channel another follower made stays."""
        if self._channels.get(node.node_id) is channel:
            del self._channels[node.node_id]
        await channel.close(None)

    async def redirect(self, node: Node, grant: TicketGrant) -> Redirect:
        """Where and how the client of ``grant`` reads its job's output from ``node``
        itself (raises :class:`~.nodes.Unreachable` when the agent does not answer)."""
        cert = self._identity.cert_pem
        redirect: Redirect = await call(node.agent.output_ticket.remote(cert, grant), node)
        return redirect

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)


_RETRIED = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.CANCELLED,
)


def output_lost(job: Job, offset: int) -> FailedPrecondition:
    """The error of a follower whose job's node was lost (its spool was there)."""
    return FailedPrecondition(
        f"job {job.status.job_id} ran on node {job.node.name}, which was lost with the"
        f" job's spooled output; the stream ends at offset {offset}"
    )


class PortUnavailable(Exception):
    """The agent's port could not be reached (or refused the front): ask the agent again."""


async def stream_output(
    channel: grpc.aio.Channel, job_id: str, offset: int, follow: bool
) -> AsyncIterator[OutputChunk]:
    """A job's output from its agent's port; the agent's refusals (NOT_FOUND,
    INVALID_ARGUMENT, DATA_LOSS...) as the errors they are, a failed connection as
    :class:`PortUnavailable`."""
    method = channel.unary_stream(
        _STREAM_OUTPUT, request_serializer=pb.JobRequest.SerializeToString
    )
    rpc = method(pb.JobRequest(job_id=job_id, offset=offset, no_follow=not follow))
    try:
        async for raw in rpc:
            chunk = decode_chunk(raw)  # no end, no redirect: never asked for them
            yield OutputChunk(_STREAMS[chunk.stream], bytes(chunk.data), chunk.offset)
    except grpc.aio.AioRpcError as err:
        code = err.code()
        # CANCELLED: the channel was closed under the stream (another follower saw it fail).
        if code in _RETRIED:
            raise PortUnavailable(f"{code.name}: {err.details()}") from err
        raise error_from_code(code.name, err.details() or code.name) from None
    except asyncio.CancelledError:
        # Not this task's cancellation: the channel closed under the call (the front is
        # stopping: PortClient.close). grpc.aio raises that into the reader as a
        # cancellation, which would end the follower's call with no status at all (its
        # client then waited for the server's whole drain); a failed connection it is.
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise PortUnavailable("the channel to the node was closed") from None
    finally:
        rpc.cancel()

"""The client's side of direct output (docs/cluster.md, "Direct output"): reaching the
node a front redirected a stream to, with the redirect's certificate as the only root and
the client's own certificate, and telling a node that cannot be reached (the client then
reads through the front) from the node's answer about the job.

Light, as the client is: grpc and the codec only."""

from __future__ import annotations

# First: grpc reads process-wide settings once, when it is imported (jobworker.api.grpcenv).
from jobworker.api.grpcenv import grpc  # isort: split

import threading
from typing import Any

from jobworker.api import codec
from jobworker.api.tlsfiles import TlsFiles, load_material

#: The node port's method (proto/jobworker/v1/node.proto) and the metadata of a ticket.
NODE_STREAM_OUTPUT = "/jobworker.v1.NodeOutput/StreamOutput"
TICKET_METADATA = "jobworker-ticket"
#: How long a redirected client tries to reach the node before it reads through the server.
NODE_CONNECT_SECONDS = 3.0
#: A node's answers that send the client back to the server (unreachable, cut, or its
#: ticket refused: spent, expired); any other is the node's answer about the job.
NODE_RETRIED = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


class NodeUnreachable(Exception):
    """The job's node could not be read from: read through the server instead."""


class NodeChannels:
    """A client's channels to nodes' output ports, one per port and certificate."""

    def __init__(self, tls: TlsFiles, max_message_bytes: int) -> None:
        self._tls = tls
        self._max_message_bytes = max_message_bytes
        self._channels: dict[tuple[str, bytes], grpc.Channel] = {}

    def __bool__(self) -> bool:
        return bool(self._channels)

    def call(self, redirect: codec.Redirect, job_id: str, offset: int, follow: bool) -> Any:
        """The node's StreamOutput call for ``redirect`` (an iterator of raw chunks);
        :class:`NodeUnreachable` if the node does not connect within
        :data:`NODE_CONNECT_SECONDS`."""
        channel = self._channel(redirect)
        if not connects(channel, NODE_CONNECT_SECONDS):
            raise NodeUnreachable
        request = codec.job_request(job_id, offset, no_follow=not follow)
        method = channel.unary_stream(NODE_STREAM_OUTPUT)
        return method(request, metadata=((TICKET_METADATA, redirect.ticket),))

    def _channel(self, redirect: codec.Redirect) -> grpc.Channel:
        key = (redirect.address, redirect.certificate)
        channel = self._channels.get(key)
        if channel is None:
            material = load_material(self._tls)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=redirect.certificate,
                private_key=material.key,
                certificate_chain=material.cert_chain,
            )
            options = [
                ("grpc.max_receive_message_length", self._max_message_bytes),
                ("grpc.ssl_target_name_override", redirect.server_name),
            ]
            channel = grpc.secure_channel(redirect.address, credentials, options=options)
            self._channels[key] = channel
        return channel

    def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


def connects(channel: grpc.Channel, timeout: float) -> bool:
    """Whether ``channel`` connects (TCP and TLS) within ``timeout`` seconds: False at its
    first failure (refused, no route, a certificate not the one pinned), not at the end
    of grpc's own connect timeout."""
    settled = threading.Event()
    states: list[grpc.ChannelConnectivity] = []

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            states.append(state)
            settled.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        settled.wait(timeout)
    finally:
        channel.unsubscribe(watch)
    return bool(states) and states[0] is grpc.ChannelConnectivity.READY

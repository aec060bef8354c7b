"""The node agent's output port outside Ray: first callers racing to start it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cryptography.x509.oid import ExtendedKeyUsageOID

from jobworker.backends.ray.agentport import AgentPort
from jobworker.backends.ray.outputport import FRONT_NAME, SelfSigned, TicketGrant
from jobworker.model import OutputChunk


async def _nothing(job_id: str, offset: int, follow: bool) -> AsyncIterator[OutputChunk]:
    return
    yield


def test_first_callers_at_once_start_one_server() -> None:
    """Two fronts asking, and a ticket, all before the port listens: one server, one
    address (each first caller used to start a server of its own, the others leaked)."""
    fronts = [SelfSigned.new(FRONT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH) for _ in range(2)]
    grant = TicketGrant("j", fronts[0].cert_pem, "alice", None, fronts[1].cert_pem)

    async def scenario() -> None:
        port = AgentPort("127.0.0.1", _nothing)
        try:
            first, second, redirect = await asyncio.gather(
                port.open(fronts[0].cert_pem),
                port.open(fronts[1].cert_pem),
                port.ticket(fronts[0].cert_pem, grant),
            )
            assert first.address == second.address == redirect.address
            assert first.address.startswith("127.0.0.1:")
        finally:
            if port._server is not None:
                await port._server.stop(None)

    asyncio.run(scenario())

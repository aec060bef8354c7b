"""The stack's ceiling: a bare grpc.aio server-streaming RPC over the same mTLS set-up.

``/bench.Bare/Stream`` takes the number of bytes to send (ASCII) and sends them as
messages of ``--message-bytes`` (the size of jobworker's output chunks), with no protobuf
and no work per message: what grpcio + TLS on loopback can move at best.
"""

from __future__ import annotations

# jobworker.api.tls sets grpc's process-wide TLS options while it imports grpc: it goes first.
from jobworker.api import tls  # isort: split

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from jobworker.api.pki import PkiPaths


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--message-bytes", type=int, default=64 * 1024)
    options = p.parse_args()
    pki = PkiPaths(options.pki)
    message = b"\0" * options.message_bytes

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        remaining = int(request)
        while remaining > 0:
            piece = message if remaining >= len(message) else message[:remaining]
            remaining -= len(piece)
            yield piece

    handler = grpc.method_handlers_generic_handler(
        "bench.Bare", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )

    async def run() -> None:
        server = grpc.aio.server(handlers=[handler])
        port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(pki.server()))
        await server.start()
        print(f"127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


if __name__ == "__main__":
    main()

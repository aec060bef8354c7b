"""One follower process: streams a job's output (or the bare ceiling RPC) and reports.

It connects first (so the TLS handshake is done), prints ``ready``, and with ``--job -``
then reads the job id (bare mode: the byte count) from stdin: the benchmark can start its
followers before the job. It prints one JSON line when the stream ends: bytes received,
seconds from the call to the last byte, its own CPU seconds, and the sha256 of the data
with ``--digest``.
``--mode stall`` reads the first chunk and then nothing more until it is killed (a client
that stopped reading).
"""

from __future__ import annotations

# jobworker.api.grpcenv sets grpc's process-wide TLS options while it imports grpc: it goes first.
from jobworker.client import channel_credentials  # isort: split

import argparse
import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path

import grpc

from jobworker.api.pki import PkiPaths
from jobworker.client import JobClient

CLIENT = "bench"


def bare_chunks(address: str, pki: Path, go: str) -> Iterable[bytes]:
    with grpc.secure_channel(address, channel_credentials(PkiPaths(pki).client(CLIENT))) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        print("ready", flush=True)
        total = int(input().strip() if go == "-" else go)
        yield b""
        yield from ch.unary_stream("/bench.Bare/Stream")(str(total).encode())


def job_chunks(
    address: str, pki: Path, job_id: str, relay: bool = False
) -> Iterable[bytes | memoryview]:
    with JobClient(address, PkiPaths(pki).client(CLIENT), direct_output=not relay) as client:
        client.list()
        print("ready", flush=True)
        if job_id == "-":
            job_id = input().strip()
        yield b""
        # Views into the messages, as `jobworker run` and `logs` read them.
        for _stream, data, _offset in client.stream_views(job_id):
            yield data


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("pki", type=Path)
    p.add_argument(
        "--job",
        default="-",
        help="job id (bare: bytes to ask for), or - to read it from stdin",
    )
    p.add_argument("--mode", choices=["read", "stall", "bare"], default="read")
    p.add_argument("--digest", action="store_true")
    p.add_argument(
        "--relay", action="store_true", help="through the server, never from a cluster's node"
    )
    options = p.parse_args()
    if options.mode == "bare":
        chunks = iter(bare_chunks(options.address, options.pki, options.job))
    else:
        chunks = iter(job_chunks(options.address, options.pki, options.job, options.relay))
    next(chunks)  # connected
    digest = hashlib.sha256() if options.digest else None
    received = 0
    began = time.perf_counter()
    cpu_began = time.process_time()
    for data in chunks:
        if options.mode == "stall":
            time.sleep(3600)  # killed by the benchmark
        received += len(data)
        if digest is not None:
            digest.update(data)
    seconds = time.perf_counter() - began
    result: dict[str, object] = {
        "bytes": received,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_began,
    }
    if digest is not None:
        result["sha256"] = digest.hexdigest()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

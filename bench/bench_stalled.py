"""Server memory pinned by followers that never read (issue 11, "Streams").

A job writes SIZE MiB and keeps running; N followers open its output stream over a few
connections and never read a message (or, with ``--read-first M``, read M MiB promptly
and then stop: the worst case, a follower that earned full-size messages). The server's
RSS is read before (after a warm-up), with the N followers stalled (once it stops
growing), and again after they are cancelled and their connections closed. With
``--baseline-src DIR`` (a checkout of the version to compare with: ``git archive REV |
tar -x -C DIR``) the same is done against that version's server, alternating, in the same
run.
"""

from __future__ import annotations

# jobworker.api.grpcenv sets grpc's process-wide TLS options while it imports grpc: it goes first.
from jobworker.client import channel_credentials  # isort: split

import statistics
import time
from pathlib import Path
from typing import Any

import grpc
from _common import (
    CLIENT,
    MiB,
    add_baseline_option,
    header,
    jobworker_server,
    make_pki,
    parser,
    row,
    workdir,
)

from jobworker.api.pki import PkiPaths
from jobworker.client import JobClient
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc


def settled_rss(server: Any, seconds: float = 60.0, quiet: int = 3) -> int:
    """VmRSS once it has not grown for ``quiet`` seconds in a row (or after ``seconds``):
    one second without growth is not enough on a loaded machine, where the server may
    pause between sends to the followers."""
    deadline = time.monotonic() + seconds
    last = server.status()["VmRSS"]
    still = 0
    while time.monotonic() < deadline and still < quiet:
        time.sleep(1.0)
        now = server.status()["VmRSS"]
        still = still + 1 if now <= last else 0
        last = max(last, now)
    return last


def one_round(
    pki: PkiPaths,
    work: Path,
    n: int,
    size_mib: int,
    src: Path | None,
    label: str,
    read_first: int = 0,
) -> dict[str, float]:
    extra = [] if src is not None else ["--max-streams-per-client", str(n + 10)]
    with (
        jobworker_server(pki, work, extra=extra, src=src, name=f"server-{label}") as server,
        JobClient(server.address, pki.client(CLIENT)) as client,
    ):
        warm = client.start("head", ["-c", str(64 * MiB), "/dev/zero"])
        for _ in client.stream(warm):
            pass
        before = settled_rss(server, 10)
        job = client.start("sh", ["-c", f"head -c {size_mib * MiB} /dev/zero; exec sleep 600"])
        while client.status(job).output_bytes < size_mib * MiB:
            time.sleep(0.1)
        creds = channel_credentials(pki.client(CLIENT))
        channels = [grpc.secure_channel(server.address, creds) for _ in range(max(1, n // 50))]
        calls = []
        for i in range(n):
            stub = pb_grpc.JobServiceStub(channels[i % len(channels)])
            call = stub.StreamOutput(pb.JobRequest(job_id=job))
            taken = 0
            while taken < read_first:  # a follower that kept up for a while, then stopped
                taken += len(next(call).data)
            calls.append(call)
        stalled = settled_rss(server)
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
        time.sleep(2.0)
        after = settled_rss(server, 10)
        client.stop(job, grace=0)
    return {"before": before / MiB, "stalled": stalled / MiB, "after": after / MiB}


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--followers", type=int, default=500)
    p.add_argument("--size", type=int, default=256, help="MiB the job writes before it waits")
    p.add_argument("--repeat", type=int, default=2)
    add_baseline_option(p)
    p.add_argument(
        "--read-first",
        type=int,
        default=0,
        help="MiB each follower reads promptly before it stops (the worst case: 16)",
    )
    options = p.parse_args()
    n = 100 if options.quick else options.followers
    read_first = options.read_first * MiB
    stalled = f"stalled after reading {options.read_first} MiB" if read_first else "stalled"
    header(f"server RSS with {n} {stalled} followers of one job ({options.size} MiB written)")
    versions: list[tuple[str, Path | None]] = [("this version", None)]
    if options.baseline_src is not None:
        versions.insert(0, (f"baseline {options.baseline_src}", options.baseline_src))
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in versions}
    with workdir() as work:
        pki = make_pki(work / "pki")
        for _ in range(options.repeat):
            for label, src in versions:
                results[label].append(
                    one_round(pki, work, n, options.size, src, label[:8], read_first)
                )
    for label, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row(
            label,
            f"RSS before {med['before']:.0f} MiB, with {n} stalled {med['stalled']:.0f} MiB"
            f" ({(med['stalled'] - med['before']) / n * 1024:.0f} KiB each),"
            f" after they left {med['after']:.0f} MiB",
            "runs: " + "; ".join(f"{r['stalled']:.0f}/{r['after']:.0f}" for r in runs),
        )


if __name__ == "__main__":
    main()

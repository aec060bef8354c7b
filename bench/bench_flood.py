"""RPC latency under an output flood: three jobs ``cat /dev/zero`` as fast as they can while
a client asks GetStatus of a fourth (sleeping) job every 20 ms for 8 s, then stops it.

What it shows: whether reading and spooling other jobs' output takes the server's answers
down with it (the event loop sharing a GIL, or the CPU, with ingestion). A fresh server per
run (its spool starts empty); with ``--baseline-src``, the versions alternate run by run.
"""

from __future__ import annotations

import statistics
import time

from _common import (
    CLIENT,
    add_baseline_option,
    header,
    jobworker_server,
    make_pki,
    parser,
    percentile,
    row,
    versions,
    workdir,
)

from jobworker.client import JobClient

WRITERS = 3
SECONDS = 8.0
INTERVAL = 0.02


def one_run(client: JobClient) -> tuple[float, float, float, float]:
    """(GetStatus p50, p99, max, then StopJob), in milliseconds."""
    sleeper = client.start("sleep", ["600"])
    writers = [client.start("sh", ["-c", "cat /dev/zero"]) for _ in range(WRITERS)]
    time.sleep(1)
    latencies = []
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        began = time.monotonic()
        client.status(sleeper)
        latencies.append(time.monotonic() - began)
        time.sleep(INTERVAL)
    began = time.monotonic()
    client.stop(sleeper, grace=5)
    stop = time.monotonic() - began
    for job in writers:
        client.stop(job, grace=0)
    ms = [s * 1000 for s in latencies]
    return percentile(ms, 0.5), percentile(ms, 0.99), max(ms), stop * 1000


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--repeat", type=int, default=4, help="runs of each version")
    add_baseline_option(p)
    options = p.parse_args()
    repeat = 1 if options.quick else options.repeat
    header(f"GetStatus every {INTERVAL * 1000:g} ms while {WRITERS} jobs write all they can")
    sources = versions(options.baseline_src)
    results: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n, _ in sources}
    with workdir() as work:
        pki = make_pki(work / "pki")
        for index in range(repeat):
            for name, src in sources:
                with (
                    jobworker_server(
                        pki, work, src=src, name=f"{name.replace(' ', '-')}-{index}", retain=5
                    ) as server,
                    JobClient(server.address, pki.client(CLIENT)) as client,
                ):
                    results[name].append(one_run(client))
    for name, runs in results.items():
        row(
            f"{name}: GetStatus p50 / p99 (median of runs)",
            f"{statistics.median(r[0] for r in runs):.1f} / "
            f"{statistics.median(r[1] for r in runs):.1f} ms",
            "p99 per run:",
            [round(r[1], 1) for r in runs],
        )
        row(
            f"{name}: slowest GetStatus / StopJob",
            f"{max(r[2] for r in runs):.1f} / {statistics.median(r[3] for r in runs):.1f} ms",
            "max per run:",
            [round(r[2]) for r in runs],
        )


if __name__ == "__main__":
    main()

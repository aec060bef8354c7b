"""Status and stop latency while a job writes at full speed to a slow spool disk.

Each spool write is made 50 ms slower (``_slow_spool.py``; ``--delay-ms``), as when the
kernel throttles a writer past its dirty-page limit. A job writes SIZE MiB as fast as it
can while this client asks GetStatus every 20 ms and then stops a sleeping job; the same
is done without the delay. With ``--baseline-src DIR`` (``git archive REV | tar -x -C DIR``)
that version's server is measured too, alternating, in the same run.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from _common import (
    BENCH_DIR,
    CLIENT,
    MiB,
    header,
    jobworker_server,
    make_pki,
    ms,
    parser,
    percentile,
    row,
    workdir,
)

from jobworker.client import JobClient
from jobworker.pki import PkiPaths


def one_round(
    pki: PkiPaths, work: Path, size_mib: int, delay_ms: float, src: Path | None, label: str
) -> dict[str, float]:
    os.environ["JOBWORKER_SLOW_WRITE_MS"] = str(delay_ms)
    with (
        jobworker_server(
            pki, work, src=src, name=f"server-{label}", wrapper=BENCH_DIR / "_slow_spool.py"
        ) as server,
        JobClient(server.address, pki.client(CLIENT)) as client,
    ):
        sleeper = client.start("sleep", ["600"])
        job = client.start("head", ["-c", str(size_mib * MiB), "/dev/zero"])
        began = time.monotonic()
        latencies = []
        while True:
            t0 = time.monotonic()
            status = client.status(job)
            latencies.append(time.monotonic() - t0)
            if status.ended_at is not None or time.monotonic() - began > 20:
                break
            time.sleep(0.02)
        t0 = time.monotonic()
        client.stop(sleeper, grace=5)
        stop = time.monotonic() - t0
        ran = (status.ended_at or time.time()) - status.started_at
        client.stop(job, grace=0)
    return {
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
        "stop": stop,
        "job": ran,
        "samples": len(latencies),
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--size", type=int, default=256, help="MiB the job writes")
    p.add_argument("--delay-ms", type=float, default=50.0)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--baseline-src", type=Path)
    options = p.parse_args()
    size = 64 if options.quick else options.size
    header(f"GetStatus/StopJob latency while a job writes {size} MiB to a slow spool")
    versions: list[tuple[str, Path | None]] = [("this version", None)]
    if options.baseline_src is not None:
        versions.insert(0, ("baseline", options.baseline_src))
    cases = [(label, src, d) for label, src in versions for d in (0.0, options.delay_ms)]
    results: dict[str, list[dict[str, float]]] = {}
    with workdir() as work:
        pki = make_pki(work / "pki")
        for _ in range(options.repeat):
            for label, src, delay in cases:
                name = f"{label}, writes +{delay:g} ms"
                results.setdefault(name, []).append(
                    one_round(pki, work, size, delay, src, label[:4])
                )
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row(
            name,
            f"GetStatus p50 {ms(med['p50'])} p99 {ms(med['p99'])} max {ms(med['max'])};"
            f" StopJob {ms(med['stop'])}; job ran {med['job']:.1f} s; {med['samples']:.0f} samples",
            "max per run: " + ", ".join(ms(r["max"]) for r in runs),
        )


if __name__ == "__main__":
    main()

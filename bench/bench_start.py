"""Start latency: StartJob over mTLS until the command runs, against a local spawn.

``JobClient.start`` returns when the server answers, and the server answers once the
launcher has ``execve``d the command (docs/spawning.md), so the round trip is "until the
process is running". The same server with ``--no-isolation`` shows what the job's
namespaces and account switch cost. Baselines in the same run: ``subprocess.Popen`` of the
same command (which also returns after a successful exec), the interpreter start-up that
the launcher pays (``python -I -S -c pass``), and one GetStatus round trip (the RPC's own
cost).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

from _common import (
    CLIENT,
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

COMMAND = ["true"]


def timed(action: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        action()
        samples.append(time.perf_counter() - began)
    return samples


def local_spawn() -> None:
    proc = subprocess.Popen(COMMAND)
    proc.wait()  # inside the timing too: the zombie is reaped by the same call


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--starts", type=int, default=500)
    options = p.parse_args()
    starts = 100 if options.quick else options.starts
    header(f"start latency: {starts} sequential starts of {' '.join(COMMAND)!r}")
    with workdir() as work:
        pki = make_pki(work / "pki")
        runs: dict[bool, list[float]] = {True: [], False: []}
        # Isolated and unisolated servers side by side, in alternating rounds.
        for isolated in (True, False) * 2:
            with (
                jobworker_server(pki, work, retain=starts + 100, isolation=isolated) as server,
                JobClient(server.address, pki.client(CLIENT)) as client,
            ):
                job = client.start(*COMMAND)
                for _ in range(20):  # warm-up: connection, code paths, page cache
                    client.start(*COMMAND)
                rpc = timed(lambda job=job: client.status(job), starts // 2)
                runs[isolated] += timed(lambda: client.start(*COMMAND), starts // 2)
        jobs, unisolated = runs[True], runs[False]
    local = timed(local_spawn, starts)
    interp = timed(
        lambda: subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True),
        max(20, starts // 5),
    )
    for label, samples in (
        ("StartJob over mTLS (jobworker, isolated)", jobs),
        ("StartJob, --no-isolation", unisolated),
        ("subprocess.Popen + wait (local baseline)", local),
        ("python -I -S -c pass (launcher floor)", interp),
        ("GetStatus round trip (RPC floor)", rpc),
    ):
        row(
            label,
            f"p50 {ms(percentile(samples, 0.5))}",
            f"p99 {ms(percentile(samples, 0.99))}",
            f"max {ms(max(samples))}",
        )
    p50, p99 = percentile(jobs, 0.5), percentile(jobs, 0.99)
    row("ratio StartJob / local spawn (p50)", f"{p50 / percentile(local, 0.5):.1f}x")
    row(
        "isolation's price (p50, p99)",
        ms(p50 - percentile(unisolated, 0.5)),
        ms(p99 - percentile(unisolated, 0.99)),
    )
    row("StartJob p50 minus the RPC floor (spawn path)", ms(p50 - percentile(rpc, 0.5)))
    row("target p50 <= 15 ms, p99 <= 50 ms", f"p50 {ms(p50)}", f"p99 {ms(p99)}")


if __name__ == "__main__":
    main()

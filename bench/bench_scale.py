"""Scale: many running jobs at once, and status/stop latency as the job table grows.

1. ``--running`` (1000) ``sleep`` jobs started concurrently and all running together: how
   long starting them took, the server's RSS, descriptors and threads, GetStatus and
   ListJobs latency with them running, and the time to stop them all at once.
2. On a fresh server: GetStatus and StopJob latency p50 with 10, 1000 and 10000 jobs in
   the table (finished ``true`` jobs retained, plus the running ones being stopped): it
   should stay flat. StopJob is measured on a running ``sleep`` (SIGTERM, exit, reaped,
   pipes drained). ListJobs, which returns the whole table, is shown for contrast.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from _common import (
    CLIENT,
    MiB,
    fd_count,
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

POOL = 8  # concurrent client calls while starting many jobs


def timed(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def p50(actions: list[Callable[[], object]]) -> str:
    return ms(percentile([timed(a) for a in actions], 0.5))


def wait_all_finished(client: JobClient) -> None:
    while any(v.ended_at is None for v in client.list()):
        time.sleep(0.2)


def many_running(pki_dir: object, work: object, running: int) -> None:
    pki, tmp = pki_dir, work
    with (
        jobworker_server(pki, tmp, max_running=running + 10) as server,  # type: ignore[arg-type]
        JobClient(server.address, pki.client(CLIENT)) as client,  # type: ignore[attr-defined]
        ThreadPoolExecutor(POOL) as pool,
    ):
        client.list()
        idle, idle_fds = server.status(), fd_count(server.pid)
        began = time.perf_counter()
        jobs = list(pool.map(lambda _: client.start("sleep", ["600"]), range(running)))
        start_all = time.perf_counter() - began
        assert all(v.ended_at is None for v in client.list())
        busy, fds = server.status(), fd_count(server.pid)
        status = p50([lambda: client.status(random.choice(jobs))] * 200)
        listing = p50([client.list] * 10)
        began = time.perf_counter()
        list(pool.map(lambda j: client.stop(j, grace=5), jobs))
        stop_all = time.perf_counter() - began
    row(
        f"start {running} sleep jobs ({POOL} concurrent clients)",
        f"{start_all:.1f} s",
        f"{running / start_all:.0f} starts/s",
    )
    row(
        f"server with {running} running",
        f"RSS {idle['VmRSS'] / MiB:.0f} -> {busy['VmRSS'] / MiB:.0f} MiB",
        f"fds {idle_fds} -> {fds}",
        f"threads {busy['Threads']}",
    )
    row(f"GetStatus p50 with {running} running", status)
    row(f"ListJobs p50 with {running} running", listing)
    row(f"stop all {running} at once", f"{stop_all:.1f} s")


def table_sizes(pki_dir: object, work: object, sizes: list[int], samples: int, stops: int) -> None:
    pki, tmp = pki_dir, work
    with (
        jobworker_server(pki, tmp, retain=max(sizes) + 100) as server,  # type: ignore[arg-type]
        JobClient(server.address, pki.client(CLIENT)) as client,  # type: ignore[attr-defined]
        ThreadPoolExecutor(POOL) as pool,
    ):
        in_table = 0
        for size in sizes:
            missing = size - in_table - stops
            if missing > 0:
                list(pool.map(lambda _: client.start("true"), range(missing)))
            wait_all_finished(client)
            jobs = [v.job_id for v in client.list()]
            victims = [client.start("sleep", ["600"]) for _ in range(stops)]
            in_table = len(jobs) + len(victims)
            pick = jobs or victims
            status = p50([lambda p=pick: client.status(random.choice(p))] * samples)  # type: ignore[misc]
            stop = p50([lambda j=j: client.stop(j, grace=5) for j in victims])  # type: ignore[misc]
            listing = p50([client.list] * 3)
            row(
                f"{in_table} jobs in the table",
                f"GetStatus p50 {status}",
                f"StopJob p50 {stop}",
                f"ListJobs p50 {listing}",
                f"RSS {server.status()['VmRSS'] / MiB:.0f} MiB",
            )


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--running", type=int, default=1000)
    p.add_argument("--tables", default="10,1000,10000", help="job table sizes")
    p.add_argument("--samples", type=int, default=200, help="GetStatus calls per size")
    p.add_argument("--stops", type=int, default=10, help="StopJob calls per size")
    options = p.parse_args()
    running = 200 if options.quick else options.running
    sizes = [10, 300, 1000] if options.quick else [int(t) for t in options.tables.split(",")]
    header(f"scale: {running} running jobs; table sizes {sizes}")
    with workdir() as work:
        pki = make_pki(work / "pki")
        many_running(pki, work, running)
        table_sizes(pki, work, sizes, options.samples, options.stops)


if __name__ == "__main__":
    main()

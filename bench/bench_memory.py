"""Server memory: peak RSS while a job writes SIZE bytes with a follower, and RSS per
retained finished job.

The server runs as a process of its own; its VmRSS is sampled every 50 ms and VmHWM
(the kernel's high-water mark) read at the end, and the same for its ingest process (the
server's work too: growth counts both). Growth is measured from the RSS after a warm-up
job, so start-up allocations are not counted. Output is spooled to a file and
read back with ``pread``: it lives in the page cache, which RSS does not count.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from _common import (
    CLIENT,
    GiB,
    MiB,
    followers,
    header,
    jobworker_server,
    make_pki,
    parser,
    row,
    workdir,
)

from jobworker.client import JobClient


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--size", type=float, default=10.0, help="GiB written by the job")
    p.add_argument("--retained", type=int, default=2000, help="finished jobs to retain")
    options = p.parse_args()
    size = int((1.0 if options.quick else options.size) * GiB)
    retained = 300 if options.quick else options.retained
    header(f"server memory: a {size / GiB:g} GiB job with a follower; {retained} retained jobs")
    with workdir() as work:
        pki = make_pki(work / "pki")
        with (
            jobworker_server(pki, work, retain=retained + 100) as server,
            JobClient(server.address, pki.client(CLIENT)) as client,
        ):
            warm = followers(server.address, pki, 1)
            warm.go(client.start("head", ["-c", str(64 * MiB), "/dev/zero"]))
            warm.results()
            before = server.status()
            ingest_before = server.ingest_status()
            peak = before["VmRSS"]
            ingest_peak = ingest_before["VmRSS"]
            done = threading.Event()

            def sample() -> None:
                nonlocal peak, ingest_peak
                while not done.is_set():
                    peak = max(peak, server.status()["VmRSS"])
                    ingest_peak = max(ingest_peak, server.ingest_status()["VmRSS"])
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample)
            sampler.start()
            one = followers(server.address, pki, 1)
            one.go(client.start("head", ["-c", str(size), "/dev/zero"]))
            (result,) = one.results()
            done.set()
            sampler.join()
            after = server.status()
            ingest_after = server.ingest_status()
            assert result["bytes"] == size, result

            base = server.status()["VmRSS"]
            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(lambda _: client.start("true"), range(retained)))
            while any(v.ended_at is None for v in client.list()):
                time.sleep(0.1)
            time.sleep(0.5)
            full = server.status()["VmRSS"]
            assert len(ids) == retained
    ingest_growth = max(ingest_after["VmHWM"], ingest_peak) - ingest_before["VmRSS"]
    growth = max(after["VmHWM"], peak) - before["VmRSS"] + ingest_growth
    row("server RSS after warm-up", f"{before['VmRSS'] / MiB:.1f} MiB")
    row(
        "ingest process RSS after warm-up / peak (sampled) / VmHWM after",
        f"{ingest_before['VmRSS'] / MiB:.1f} / {ingest_peak / MiB:.1f}"
        f" / {ingest_after['VmHWM'] / MiB:.1f} MiB",
    )
    row(f"peak RSS during the {size / GiB:g} GiB job (sampled)", f"{peak / MiB:.1f} MiB")
    row(
        "VmHWM before / after the job",
        f"{before['VmHWM'] / MiB:.1f} / {after['VmHWM'] / MiB:.1f} MiB",
    )
    row("RSS growth, server and ingest process (target < 50 MiB)", f"{growth / MiB:.1f} MiB")
    row("follower rate during it", f"{result['bytes'] / result['seconds'] / 1e6:.0f} MB/s")
    row(
        f"RSS per retained finished job ({retained} jobs)",
        f"{(full - base) / retained / 1024:.1f} KiB",
        f"({base / MiB:.1f} -> {full / MiB:.1f} MiB)",
    )


if __name__ == "__main__":
    main()

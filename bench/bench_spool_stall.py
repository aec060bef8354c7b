"""Status and stop latency while a job writes at full speed to a slow spool disk.

Each spool write is made 50 ms slower (``_slow_spool.py``; ``--delay-ms``), as when the
kernel throttles a writer past its dirty-page limit. A job writes SIZE MiB as fast as it
can while this client asks GetStatus every 20 ms and then stops a sleeping job; the same
is done without the delay. With ``--baseline-src DIR`` (``git archive REV | tar -x -C DIR``)
that version's server is measured too, alternating, in the same run.

``--io-max BYTES_PER_S`` throttles a real disk instead, and needs a pure cgroup v2 kernel
with a scratch disk: run it in the project's VM (``python tests/vm/run_vm.py --scratch-mib
1024 -- .venv/bin/python bench/bench_spool_stall.py --io-max 4194304``). The scratch disk
gets an ext4 file system for the spool; the server runs in a cgroup of its own
(``_in_cgroup.py``) with ``io.max`` limiting its writes to that disk and ``memory.max``
bounding its dirty pages, so the kernel throttles the spool writes themselves (in
``balance_dirty_pages``), exactly as on a slow or shared disk. Rounds with and without the
limit alternate.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from _common import (
    BENCH_DIR,
    CLIENT,
    MiB,
    add_baseline_option,
    header,
    jobworker_server,
    make_pki,
    ms,
    parser,
    percentile,
    row,
    workdir,
)

from jobworker.api.pki import PkiPaths
from jobworker.client import JobClient

SCRATCH_SERIAL = "jwscratch"  # tests/vm/run_vm.py's scratch disk
SPOOL_MOUNT = Path("/mnt/jobworker-bench-spool")
SERVER_CGROUP = Path("/sys/fs/cgroup/jobworker-bench-server")


def throttled_disk() -> str:
    """Format and mount the VM's scratch disk for the spool, make the server's cgroup;
    returns the disk's ``MAJ:MIN``."""
    if os.environ.get("JOBWORKER_VM") != "1":
        raise SystemExit("--io-max needs the project's VM: see this script's docstring")
    for block in Path("/sys/block").iterdir():
        serial = block / "serial"
        if serial.exists() and serial.read_text().strip() == SCRATCH_SERIAL:
            break
    else:
        raise SystemExit(f"no disk with serial {SCRATCH_SERIAL}: run with tests/vm/run_vm.py")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # the VM boots with it down
    subprocess.run(["mkfs.ext4", "-q", "-F", f"/dev/{block.name}"], check=True)
    SPOOL_MOUNT.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", f"/dev/{block.name}", str(SPOOL_MOUNT)], check=True)
    (Path("/sys/fs/cgroup") / "cgroup.subtree_control").write_text("+io +memory")
    SERVER_CGROUP.mkdir(exist_ok=True)
    # Dirty pages are bounded by the cgroup's memory: the kernel throttles the writer
    # once a share of it is dirty, instead of after a share of all the VM's memory.
    (SERVER_CGROUP / "memory.max").write_text(str(384 << 20))
    return (block / "dev").read_text().strip()


def one_round(
    pki: PkiPaths,
    work: Path,
    size_mib: int,
    delay_ms: float,
    src: Path | None,
    label: str,
    io_max: tuple[str, int | None] | None = None,
) -> dict[str, float]:
    os.environ["JOBWORKER_SLOW_WRITE_MS"] = str(delay_ms)
    wrapper, extra = BENCH_DIR / "_slow_spool.py", []
    if io_max is not None:
        device, limit = io_max
        rate = "max" if limit is None else str(limit)
        (SERVER_CGROUP / "io.max").write_text(f"{device} wbps={rate}")
        os.environ["JOBWORKER_BENCH_CGROUP"] = str(SERVER_CGROUP)
        wrapper, extra = BENCH_DIR / "_in_cgroup.py", ["--spool-dir", str(SPOOL_MOUNT / label)]
    with (
        jobworker_server(
            pki, work, src=src, name=f"server-{label}", wrapper=wrapper, extra=extra
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
        spooled = client.status(job).output_bytes
        t0 = time.monotonic()
        client.stop(job, grace=0)
        stop_writer = time.monotonic() - t0
    return {
        "spooled_mib": spooled / MiB,
        "stop_writer": stop_writer,
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
    add_baseline_option(p)
    p.add_argument("--io-max", type=int, help="throttle a real disk to this many bytes/s (VM)")
    options = p.parse_args()
    size = 64 if options.quick else options.size
    if options.io_max is not None:
        io_max_main(options, size)
        return
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
    report(results)


def io_max_main(options: Any, size: int) -> None:
    device = throttled_disk()
    header(
        f"GetStatus/StopJob latency while a job writes {size} MiB to a spool on a disk"
        f" throttled by io.max ({options.io_max / MiB:g} MiB/s) in a cgroup v2 VM"
    )
    results: dict[str, list[dict[str, float]]] = {}
    with workdir() as work:
        pki = make_pki(work / "pki")
        for i in range(options.repeat):
            for limit in (None, options.io_max):
                name = "disk unthrottled" if limit is None else f"io.max wbps={limit}"
                label = f"r{i}-{'free' if limit is None else 'slow'}"
                results.setdefault(name, []).append(
                    one_round(pki, work, size, 0.0, None, label, (device, limit))
                )
    report(results)


def report(results: dict[str, list[dict[str, float]]]) -> None:
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row(
            name,
            f"GetStatus p50 {ms(med['p50'])} p99 {ms(med['p99'])} max {ms(med['max'])};"
            f" StopJob {ms(med['stop'])}; job ran {med['job']:.1f} s; {med['samples']:.0f} samples;"
            f" spooled {med['spooled_mib']:.0f} MiB, stopping the writer {ms(med['stop_writer'])}",
            "max per run: " + ", ".join(ms(r["max"]) for r in runs),
        )


if __name__ == "__main__":
    main()

"""The job is not slowed by its followers: run time of a job writing SIZE bytes to stdout
with 0, 1 and 10 followers, one of the ten stalled (it reads one chunk, then nothing).

Run time is the server's own ``ended_at - started_at``. The job's output goes to the spool
file whatever the followers do, so only CPU shared with them (2 cores here) may slow it.
For scale: the same command writing into a pipe that this process drains locally.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from _common import (
    CLIENT,
    MB,
    GiB,
    followers,
    header,
    jobworker_server,
    make_pki,
    parser,
    row,
    workdir,
)

from jobworker.client import JobClient


def local_pipe(command: list[str]) -> float:
    began = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    while proc.stdout.read1(1 << 20):
        pass
    proc.wait()
    return time.perf_counter() - began


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--size", type=float, default=2.0, help="GiB per job (default 2)")
    p.add_argument(
        "--baseline-src",
        type=Path,
        help="also run this checkout's server first (git archive REV | tar -x -C DIR)",
    )
    options = p.parse_args()
    size = int((0.25 if options.quick else options.size) * GiB)
    command = ["head", "-c", str(size), "/dev/zero"]
    header(f"job run time with followers: {' '.join(command)}")
    versions: list[tuple[str, Path | None]] = [("jobworker", None)]
    if options.baseline_src is not None:
        versions.insert(0, (f"baseline {options.baseline_src.name}", options.baseline_src))
    results: dict[str, dict[str, float]] = {name: {} for name, _ in versions}
    with workdir() as work:
        pki = make_pki(work / "pki")
        for name, src in versions:
            with (
                jobworker_server(pki, work, src=src, name=name.replace(" ", "-")) as server,
                JobClient(server.address, pki.client(CLIENT)) as client,
            ):
                for label, readers, stalled in (
                    ("0 followers", 0, 0),
                    ("1 follower", 1, 0),
                    ("10 followers (1 stalled)", 9, 1),
                ):
                    group = followers(server.address, pki, readers)
                    stall = followers(server.address, pki, stalled, mode="stall")
                    job = client.start(command[0], command[1:])
                    group.go(job)
                    stall.go(job)
                    group.results()
                    while (status := client.status(job)).ended_at is None:
                        time.sleep(0.05)
                    stall.kill()
                    results[name][label] = status.ended_at - status.started_at
    local = local_pipe(command)
    row(
        "local: same command into a drained pipe", f"{local:.2f} s", f"{size / local / MB:.0f} MB/s"
    )
    for name, runs in results.items():
        base = runs["0 followers"]
        for label, seconds in runs.items():
            row(
                f"{name}, {label}",
                f"{seconds:.2f} s",
                f"{size / seconds / MB:.0f} MB/s",
                f"x{seconds / base:.2f} of 0 followers",
            )


if __name__ == "__main__":
    main()

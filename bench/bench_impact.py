"""The job is not slowed by its followers: run time of a job writing SIZE bytes to stdout
with 0, 1 and 10 followers, one of the ten stalled (it reads one chunk, then nothing).

Run time is the server's own ``ended_at - started_at``. The job's output goes to the spool
file whatever the followers do, so only CPU shared with them (2 cores here) may slow it.
For scale: the same command writing into a pipe that this process drains locally.

The control: the job with no follower while a bare grpc.aio stream of the same size
(``_bare_server.py``, 256 KiB messages, its own server and client processes) runs beside
it. It does the same kind of work a follower makes the machine do, and nothing of
jobworker's, so it measures what sharing the CPU with any stream at that rate costs the
job here.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import (
    CLIENT,
    MB,
    GiB,
    add_baseline_option,
    bare_server,
    followers,
    header,
    jobworker_server,
    make_pki,
    parser,
    row,
    versions,
    workdir,
)

from jobworker.backends.local.outputlog import FOLLOW_CHUNK_MAX
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
    add_baseline_option(p)
    p.add_argument("--repeat", type=int, default=1, help="runs of each, median reported")
    p.add_argument(
        "--spool-dir",
        type=Path,
        help="spool under this directory (a tmpfs keeps disk writeback out of the figures)",
    )
    options = p.parse_args()
    size = int((0.25 if options.quick else options.size) * GiB)
    command = ["head", "-c", str(size), "/dev/zero"]
    header(f"job run time with followers: {' '.join(command)}")
    sources = versions(options.baseline_src)
    results: dict[str, dict[str, list[float]]] = {name: {} for name, _ in sources}
    control = "0 followers, a bare grpc stream beside it (control)"
    with workdir() as work, contextlib.ExitStack() as stack:
        pki = make_pki(work / "pki")
        bare = stack.enter_context(bare_server(pki, work, FOLLOW_CHUNK_MAX))
        servers = []
        for name, src in sources:
            extra: list[str] = []
            if options.spool_dir is not None:
                spool = Path(tempfile.mkdtemp(prefix="bench-impact-", dir=options.spool_dir))
                stack.callback(shutil.rmtree, spool, ignore_errors=True)
                extra = ["--spool-dir", str(spool)]
            # Two jobs retained: the spool of older ones is deleted, not written back to
            # disk while later runs are timed (which made them vary 1.3-3.4 s).
            server = stack.enter_context(
                jobworker_server(
                    pki, work, src=src, name=name.replace(" ", "-"), retain=2, extra=extra
                )
            )
            client = stack.enter_context(JobClient(server.address, pki.client(CLIENT)))
            client.start("true")  # any helper process the server starts, started
            servers.append((name, server, client))
        for _ in range(options.repeat):
            for name, server, client in servers:

                def run_time(job: str, client: JobClient = client) -> float:
                    while (status := client.status(job)).ended_at is None:
                        time.sleep(0.05)
                    return status.ended_at - status.started_at

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
                    seconds = run_time(job)
                    stall.kill()
                    results[name].setdefault(label, []).append(seconds)
                beside = followers(bare.address, pki, 1, mode="bare")
                beside.go(str(size))
                job = client.start(command[0], command[1:])
                seconds = run_time(job)
                beside.results()
                results[name].setdefault(control, []).append(seconds)
    local = local_pipe(command)
    row(
        "local: same command into a drained pipe", f"{local:.2f} s", f"{size / local / MB:.0f} MB/s"
    )
    for name, runs in results.items():
        base = statistics.median(runs["0 followers"])
        for label, all_seconds in runs.items():
            seconds = statistics.median(all_seconds)
            row(
                f"{name}, {label}",
                f"{seconds:.2f} s",
                f"{size / seconds / MB:.0f} MB/s",
                f"x{seconds / base:.2f} of 0 followers",
                "runs:",
                [round(s, 2) for s in all_seconds],
            )


if __name__ == "__main__":
    main()

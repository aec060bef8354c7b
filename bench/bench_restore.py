"""What ``serve --live-restore`` costs, and how fast a restarted server adopts its jobs.

Cost, servers with and without the option side by side in the same run (alternating
rounds, ``--no-isolation``: a job without namespaces is where live restore adds a process,
the monitor that writes the exit report): StartJob p50 and p99 of ``true``, the stream rate
of one job writing ``--stream-bytes`` with one follower, and the server's RSS (with its
ingest process's) after both.

Restart: a ``--live-restore`` server runs ``--jobs`` jobs (``sleep``), is SIGKILLed, and a
new one starts on the same spool directory. Reported: from the new process's start until
it prints its address (listening), until its first GetStatus answer, and until every job is
listed running; the same for a server started on an empty spool directory (baseline).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from _common import (
    CLIENT,
    MB,
    MiB,
    ServerProcess,
    followers,
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
from jobworker.model import JobState


def _timed(action: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        action()
        samples.append(time.perf_counter() - began)
    return samples


def _stream_rate(server: ServerProcess, pki: PkiPaths, client: JobClient, size: int) -> float:
    """MB/s of one job writing ``size`` bytes to stdout, as one follower receives them."""
    reader = followers(server.address, pki, 1)
    job = client.start("head", ["-c", str(size), "/dev/zero"])
    reader.go(job)
    [result] = reader.results()
    assert result["bytes"] == size, result
    return size / MB / float(result["seconds"])


def _rss(server: ServerProcess) -> int:
    return server.status()["VmRSS"] + server.ingest_status()["VmRSS"]


def cost(pki: PkiPaths, work: Path, starts: int, size: int) -> None:
    runs: dict[bool, dict[str, list[float]]] = {
        live: {"start": [], "stream": [], "rss": []} for live in (False, True)
    }
    for round_, live in enumerate((False, True) * 2):
        extra = ["--live-restore", "--spool-dir", str(work / f"spool-{round_}")] if live else []
        with (
            jobworker_server(pki, work, isolation=False, retain=starts + 50, extra=extra) as server,
            JobClient(server.address, pki.client(CLIENT)) as client,
        ):
            for _ in range(20):  # warm-up
                client.start("true")
            runs[live]["start"] += _timed(lambda: client.start("true"), starts // 2)
            runs[live]["stream"].append(_stream_rate(server, pki, client, size))
            runs[live]["rss"].append(_rss(server))
    for live in (False, True):
        name = "--live-restore" if live else "without"
        samples = runs[live]["start"]
        row(
            f"StartJob ({name})",
            f"p50 {ms(percentile(samples, 0.5))}",
            f"p99 {ms(percentile(samples, 0.99))}",
        )
        rates = runs[live]["stream"]
        row(f"stream, 1 follower ({name})", " ".join(f"{r:.0f}" for r in rates), "MB/s")
        row(f"server + ingest RSS after ({name})", f"{max(runs[live]['rss']) / MiB:.1f} MiB")
    base, live_p50 = (percentile(runs[v]["start"], 0.5) for v in (False, True))
    row("start p50 ratio live / without", f"{live_p50 / base:.2f}x")
    base_rate, live_rate = (max(runs[v]["stream"]) for v in (False, True))
    row("stream ratio live / without (best of 2)", f"{live_rate / base_rate:.2f}x")


def _restart(pki: PkiPaths, work: Path, spool: Path, jobs: list[str]) -> None:
    """Start a live server on ``spool``; report how long until it answers and adopts."""
    began = time.perf_counter()
    extra = ["--live-restore", "--spool-dir", str(spool)]
    name = f"restart-{len(jobs)}"
    with jobworker_server(pki, work, isolation=False, extra=extra, name=name) as server:
        listening = time.perf_counter() - began
        with JobClient(server.address, pki.client(CLIENT)) as client:
            client.list()
            answered = time.perf_counter() - began
            while True:
                running = {v.job_id for v in client.list() if v.state is JobState.RUNNING}
                if running >= set(jobs):
                    break
                time.sleep(0.01)
            adopted = time.perf_counter() - began
            for job in jobs:
                client.stop(job, grace=0)
    label = f"restart with {len(jobs)} running jobs" if jobs else "start, no jobs (baseline)"
    row(label, f"listening {ms(listening)}", f"answers {ms(answered)}", f"all {ms(adopted)}")


def restart(pki: PkiPaths, work: Path, count: int) -> None:
    spool = work / "restart-spool"
    _restart(pki, work, work / "empty-spool", [])
    extra = ["--live-restore", "--spool-dir", str(spool)]
    with (
        jobworker_server(pki, work, isolation=False, extra=extra, name="before") as server,
        JobClient(server.address, pki.client(CLIENT)) as client,
    ):
        jobs = [client.start("sleep", ["1000"]) for _ in range(count)]
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
    _restart(pki, work, spool, jobs)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--starts", type=int, default=400)
    p.add_argument("--stream-bytes", type=int, default=1 << 30)
    p.add_argument("--jobs", type=int, default=300)
    options = p.parse_args()
    starts = 100 if options.quick else options.starts
    size = (256 << 20) if options.quick else options.stream_bytes
    count = 50 if options.quick else options.jobs
    header(f"live restore: {starts} starts, a {size // MiB} MiB stream, a restart under {count}")
    with workdir() as work:
        pki = make_pki(work / "pki")
        cost(pki, work, starts, size)
        restart(pki, work, count)


if __name__ == "__main__":
    main()

"""Stream throughput: one job's stdout to followers over mTLS, against the stack's ceiling.

* ceiling: a bare grpc.aio server-streaming RPC over the same mTLS set-up, 64 KiB
  messages, no protobuf and no work per message (``_bare_server.py``); and the same with
  256 KiB messages, the largest chunk jobworker sends a follower, so that message size
  alone cannot explain a ratio;
* jobworker, one follower: ``head -c SIZE /dev/zero`` as a job, read through
  ``jobworker.client.JobClient.stream`` in a process of its own;
* the bare 256 KiB stream again, with the job's own work running beside it (``head -c
  SIZE /dev/zero | cat > FILE``: the job writing into a pipe, and a copy from that pipe into
  a file, as the ingest thread does): the ceiling for a *live* job on this machine, where
  producing the output takes CPU from streaming it;
* jobworker, one follower of a job that has already finished (its output spooled and in
  the page cache): StreamOutput alone, with no job and no ingest thread taking CPU, which
  is what the bare stream measures too;
* jobworker, ten concurrent followers of one job: aggregate MB/s and fairness (slowest
  follower's rate over the fastest's); and the control, ten concurrent bare 256 KiB
  streams: what the machine allows ten streams at all, against one.

Followers connect before the job starts and time from their call to their last byte.
Ceiling and jobworker runs alternate, so that load from elsewhere hits both alike; the
server's CPU seconds per GiB sent (its ingest process's included) are reported too, being
less sensitive to that load.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import time
from collections.abc import Callable

from _common import (
    CLIENT,
    MB,
    Followers,
    GiB,
    add_baseline_option,
    bare_server,
    cpu_seconds,
    followers,
    header,
    jobworker_server,
    make_pki,
    parser,
    row,
    workdir,
)

from jobworker.backends.local.outputlog import FOLLOW_CHUNK_MAX
from jobworker.client import JobClient
from jobworker.model import JobState

MESSAGE = 64 * 1024
LARGE_MESSAGE = FOLLOW_CHUNK_MAX


def rate(result: dict[str, float]) -> float:
    return result["bytes"] / result["seconds"] / MB


#: Client CPU seconds per GiB of each kind of run, beside the server's.
CLIENT_CPU: dict[str, list[float]] = {}


def measured(
    pid: int,
    size: int,
    run: Callable[[], list[dict[str, float]]],
    prepare: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """(MB/s of the one follower, server CPU seconds per GiB) of one run, after
    ``prepare`` (whose CPU is not counted)."""
    if prepare is not None:
        prepare()
    before = cpu_seconds(pid)
    (result,) = run()
    assert result["bytes"] == size, result
    CLIENT_CPU.setdefault(run.__name__, []).append(result["cpu_seconds"] * GiB / size)
    return rate(result), (cpu_seconds(pid) - before) * GiB / size


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--size", type=float, default=2.0, help="GiB per job (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each, median reported")
    p.add_argument("--fanout", type=int, default=10)
    add_baseline_option(p)
    options = p.parse_args()
    size = int((0.25 if options.quick else options.size) * GiB)
    repeat = 1 if options.quick else options.repeat
    header(f"stream throughput: {size / GiB:g} GiB per job, median of {repeat} alternating runs")
    command = ("head", ["-c", str(size), "/dev/zero"])
    ceiling_runs: list[tuple[float, float]] = []
    large_runs: list[tuple[float, float]] = []
    beside_runs: list[tuple[float, float]] = []
    single_runs: list[tuple[float, float]] = []
    finished_runs: list[tuple[float, float]] = []
    base_runs: list[tuple[float, float]] = []
    with workdir() as work:
        pki = make_pki(work / "pki")
        with contextlib.ExitStack() as stack:
            bare = stack.enter_context(bare_server(pki, work, MESSAGE))
            bare_large = stack.enter_context(bare_server(pki, work, LARGE_MESSAGE))
            # Few jobs retained: older spools are deleted, not written back while timing.
            server = stack.enter_context(jobworker_server(pki, work, retain=3))
            client = stack.enter_context(JobClient(server.address, pki.client(CLIENT)))
            base = None
            if options.baseline_src is not None:
                base = stack.enter_context(
                    jobworker_server(pki, work, src=options.baseline_src, name="baseline", retain=3)
                )
                base_client = stack.enter_context(JobClient(base.address, pki.client(CLIENT)))

            def base_run() -> list[dict[str, float]]:
                assert base is not None
                one = followers(base.address, pki, 1)
                one.go(base_client.start(*command))
                return one.results()

            def bare_run() -> list[dict[str, float]]:
                one = followers(bare.address, pki, 1, mode="bare")
                one.go(str(size))
                return one.results()

            def bare_large_run() -> list[dict[str, float]]:
                one = followers(bare_large.address, pki, 1, mode="bare")
                one.go(str(size))
                return one.results()

            def bare_beside_run() -> list[dict[str, float]]:
                one = followers(bare_large.address, pki, 1, mode="bare")
                beside = work / "beside.out"
                producer = subprocess.Popen(
                    ["sh", "-c", f"head -c {size} /dev/zero | cat > {beside}"]
                )
                one.go(str(size))
                results = one.results()
                producer.wait()
                beside.unlink()
                return results

            def job_run() -> list[dict[str, float]]:
                one = followers(server.address, pki, 1)
                one.go(client.start(*command))
                return one.results()

            finished: list[tuple[Followers, str]] = []

            def run_job_to_the_end() -> None:
                one = followers(server.address, pki, 1)
                job = client.start(*command)
                while client.status(job).state is JobState.RUNNING:
                    time.sleep(0.05)
                finished.append((one, job))

            def finished_run() -> list[dict[str, float]]:
                one, job = finished.pop()
                one.go(job)
                return one.results()

            for _ in range(repeat):
                ceiling_runs.append(measured(bare.pid, size, bare_run))
                large_runs.append(measured(bare_large.pid, size, bare_large_run))
                beside_runs.append(measured(bare_large.pid, size, bare_beside_run))
                single_runs.append(measured(server.pid, size, job_run))
                finished_runs.append(
                    measured(server.pid, size, finished_run, prepare=run_job_to_the_end)
                )
                if base is not None:
                    base_runs.append(measured(base.pid, size, base_run))
            many = followers(server.address, pki, options.fanout)
            many.go(client.start(*command))
            results = many.results()
            assert all(r["bytes"] == size for r in results), results
            rss = server.status()
            ingest_rss = server.ingest_status()
            bare_many = followers(bare_large.address, pki, options.fanout, mode="bare")
            bare_many.go(str(size))
            bare_results = bare_many.results()
            assert all(r["bytes"] == size for r in bare_results), bare_results
    ceiling = statistics.median(r for r, _ in ceiling_runs)
    ceiling_cpu = statistics.median(c for _, c in ceiling_runs)
    large = statistics.median(r for r, _ in large_runs)
    single = statistics.median(r for r, _ in single_runs)
    single_cpu = statistics.median(c for _, c in single_runs)
    rates = [rate(r) for r in results]
    aggregate = options.fanout * size / max(r["seconds"] for r in results) / MB
    row(
        "ceiling: bare grpc.aio stream, 64 KiB msgs",
        f"{ceiling:.0f} MB/s",
        f"server CPU {ceiling_cpu:.2f} s/GiB",
        "runs:",
        [round(r) for r, _ in ceiling_runs],
    )
    row(
        f"bare grpc.aio stream, {LARGE_MESSAGE // 1024} KiB msgs",
        f"{large:.0f} MB/s",
        "runs:",
        [round(r) for r, _ in large_runs],
    )
    beside = statistics.median(r for r, _ in beside_runs)
    row(
        f"bare {LARGE_MESSAGE // 1024} KiB, the job's work beside it",
        f"{beside:.0f} MB/s",
        "runs:",
        [round(r) for r, _ in beside_runs],
    )
    row(
        "jobworker, 1 follower",
        f"{single:.0f} MB/s",
        f"server CPU {single_cpu:.2f} s/GiB",
        "runs:",
        [round(r) for r, _ in single_runs],
    )
    finished = statistics.median(r for r, _ in finished_runs)
    row(
        "jobworker, 1 follower of a finished job",
        f"{finished:.0f} MB/s",
        f"server CPU {statistics.median(c for _, c in finished_runs):.2f} s/GiB",
        "runs:",
        [round(r) for r, _ in finished_runs],
    )
    row("ratio jobworker / ceiling (target >= 0.90)", f"{single / ceiling:.2f}")
    row(f"ratio jobworker / bare with {LARGE_MESSAGE // 1024} KiB msgs", f"{single / large:.2f}")
    row(
        f"ratio jobworker / bare {LARGE_MESSAGE // 1024} KiB with the job's work beside it",
        f"{single / beside:.2f}",
    )
    row(
        f"ratio finished job / bare with {LARGE_MESSAGE // 1024} KiB msgs (target >= 0.90)",
        f"{finished / large:.2f}",
    )
    row("ratio of server CPU per GiB, ceiling / jobworker", f"{ceiling_cpu / single_cpu:.2f}")
    row(
        f"jobworker, {options.fanout} followers of one job",
        f"aggregate {aggregate:.0f} MB/s",
        f"per follower min {min(rates):.0f} / max {max(rates):.0f} MB/s",
    )
    row(
        f"aggregate of {options.fanout} / one follower (target >= 1.5)", f"{aggregate / single:.2f}"
    )
    if base_runs:
        base_rate = statistics.median(r for r, _ in base_runs)
        row(
            f"baseline {options.baseline_src}, 1 follower",
            f"{base_rate:.0f} MB/s",
            f"server CPU {statistics.median(c for _, c in base_runs):.2f} s/GiB",
            "runs:",
            [round(r) for r, _ in base_runs],
        )
        row("ratio this version / baseline", f"{single / base_rate:.2f}")
    row(
        "follower's CPU s/GiB (median)",
        ", ".join(f"{name}: {statistics.median(c):.2f}" for name, c in CLIENT_CPU.items()),
    )
    bare_aggregate = options.fanout * size / max(r["seconds"] for r in bare_results) / MB
    row(
        f"control: {options.fanout} bare {LARGE_MESSAGE // 1024} KiB streams",
        f"aggregate {bare_aggregate:.0f} MB/s",
        f"x{bare_aggregate / large:.2f} of one bare stream",
    )
    row("fairness (slowest / fastest follower)", f"{min(rates) / max(rates):.2f}")
    row("aggregate / ceiling", f"{aggregate / ceiling:.2f}")
    row(
        "VmHWM after the runs: server / its ingest process",
        f"{rss['VmHWM'] / (1 << 20):.0f} / {ingest_rss['VmHWM'] / (1 << 20):.0f} MiB",
    )


if __name__ == "__main__":
    main()

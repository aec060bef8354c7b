"""What observability costs: the metrics plugin on vs off, and usage sampling at scale.

* StartJob p50 over mTLS, servers with and without ``--plugin metrics`` side by side, in
  alternating rounds (targets: within 5%);
* stream MB/s of one follower reading one job's stdout, on vs off, alternating, median;
* sampling 1000 running jobs: the CPU one sampling tick costs (the sampler ticks once a
  second, so CPU seconds per tick = share of one core), for the ``/proc`` path (1000
  real processes, each in its own session, as jobs are) and for the cgroup path's file
  reads (1000 directories of the same files on tmpfs: the host's cgroups are hybrid, so
  this is the read and parse cost, not the kernel's cgroupfs; the VM suite covers the
  real files). Target: under 5% of one core.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    CLIENT,
    MB,
    GiB,
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

from jobworker.cgroupfs import JobCgroup
from jobworker.client import JobClient
from jobworker.usage import UsageRing, _Tracked, sample_jobs

COMMAND = ["true"]


def timed(action: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        action()
        samples.append(time.perf_counter() - began)
    return samples


def start_latency(work: Path, starts: int, rounds: int) -> dict[bool, list[float]]:
    pki = make_pki(work / "pki")
    runs: dict[bool, list[float]] = {True: [], False: []}
    for metrics in (True, False) * rounds:
        with (
            jobworker_server(pki, work, retain=starts + 100, metrics=metrics) as server,
            JobClient(server.address, pki.client(CLIENT)) as client,
        ):
            for _ in range(20):  # warm-up: connection, code paths, page cache
                client.start(*COMMAND)
            runs[metrics] += timed(lambda: client.start(*COMMAND), starts)
    return runs


def stream_rate(work: Path, size: int, repeat: int) -> dict[bool, list[float]]:
    pki = make_pki(work / "pki-stream")
    rates: dict[bool, list[float]] = {True: [], False: []}
    with (
        jobworker_server(pki, work, metrics=True) as on,
        jobworker_server(pki, work, metrics=False) as off,
    ):
        for _ in range(repeat):
            for metrics, server in ((True, on), (False, off)):
                with JobClient(server.address, pki.client(CLIENT)) as client:
                    one = followers(server.address, pki, 1)
                    one.go(client.start("head", ["-c", str(size), "/dev/zero"]))
                    (result,) = one.results()
                assert result["bytes"] == size, result
                rates[metrics].append(result["bytes"] / result["seconds"] / MB)
    return rates


def hook_cost(count: int) -> tuple[float, float]:
    """Seconds of plugin work per started job (the hooks one StartJob and its job's end
    call), with and without the metrics plugin loaded: what the plugin adds, without the
    machine's noise."""
    import argparse
    import types

    from jobworker.hooks.host import Plugins
    from jobworker.identity import Identity
    from jobworker.model import Action, TerminationReason
    from jobworker.plugins.metrics import Metrics

    identity = Identity("alice")
    status: Any = types.SimpleNamespace(
        owner="alice", exit=types.SimpleNamespace(reason=TerminationReason.EXITED)
    )

    def one_job(plugins: Plugins) -> None:
        plugins.rpc_started("StartJob")
        plugins.decision(identity, Action.START, None, True, "allowed")
        plugins.job_started(status)
        plugins.rpc_finished("StartJob", "OK", 0.01)
        plugins.on_exit(status)

    results = []
    for loaded in (False, True):
        plugins = Plugins()
        if loaded:
            metrics = Metrics()
            metrics.jobworker_configure(
                argparse.Namespace(
                    metrics_listen="127.0.0.1:0", metrics_tls=False, metrics_plain_http=False
                )
            )
            plugins.register(metrics, name="metrics")
        began = time.process_time()
        for _ in range(count):
            one_job(plugins)
        results.append((time.process_time() - began) / count)
        if loaded:
            metrics.jobworker_shutdown()
    return results[0], results[1]


def _fake_cgroup(path: Path) -> JobCgroup:
    path.mkdir()
    (path / "cpu.stat").write_text(
        "usage_usec 123456789\nuser_usec 100000000\nsystem_usec 23456789\n"
        "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n"
    )
    (path / "memory.current").write_text("104857600\n")
    (path / "memory.peak").write_text("209715200\n")
    (path / "pids.current").write_text("3\n")
    (path / "io.stat").write_text("8:0 rbytes=1048576 wbytes=4096 rios=10 wios=1 dbytes=0 dios=0\n")
    return JobCgroup(path=path)


def tick_cost(jobs: dict[str, _Tracked], ticks: int) -> float:
    """CPU seconds of one sampling tick (median of ``ticks``)."""
    costs = []
    for _ in range(ticks):
        began = time.process_time()
        found = sample_jobs(jobs)
        costs.append(time.process_time() - began)
        assert len(found) == len(jobs), f"sampled {len(found)} of {len(jobs)}"
    return statistics.median(costs)


def sampling(work: Path, count: int, ticks: int) -> tuple[float, float]:
    procs = [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(count)]
    try:
        by_proc = {f"p{p.pid}": _Tracked(p.pid, None, UsageRing()) for p in procs}
        proc_cost = tick_cost(by_proc, ticks)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    root = Path("/dev/shm") / f"jobworker-bench-{time.time_ns()}"
    root.mkdir()
    try:
        by_cgroup = {
            f"c{i}": _Tracked(0, _fake_cgroup(root / str(i)), UsageRing()) for i in range(count)
        }
        cgroup_cost = tick_cost(by_cgroup, ticks)
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)
    return proc_cost, cgroup_cost


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--starts", type=int, default=200, help="starts per round")
    p.add_argument("--rounds", type=int, default=2, help="on/off rounds, alternating")
    p.add_argument("--size", type=float, default=0.5, help="GiB per streamed job")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1000, help="running jobs to sample")
    options = p.parse_args()
    quick = options.quick
    starts = 50 if quick else options.starts
    size = int((0.125 if quick else options.size) * GiB)
    repeat = 1 if quick else options.repeat
    header(
        f"metrics on vs off: {starts} x {options.rounds} starts each, "
        f"{size / GiB:g} GiB streams x {repeat}; sampling {options.jobs} jobs"
    )
    with workdir() as work:
        runs = start_latency(work, starts, options.rounds)
        rates = stream_rate(work, size, repeat)
        proc_cost, cgroup_cost = sampling(work, options.jobs, 5 if quick else 15)
    hooks_off, hooks_on = hook_cost(20_000)
    on, off = percentile(runs[True], 0.5), percentile(runs[False], 0.5)
    row("StartJob p50, metrics off", ms(off), "p90", ms(percentile(runs[False], 0.9)))
    row("StartJob p50, metrics on", ms(on), "p90", ms(percentile(runs[True], 0.9)))
    row("StartJob p50 on / off (target <= 1.05)", f"{on / off:.3f}")
    row(
        "hook work per job, metrics off / on",
        f"{hooks_off * 1e6:.1f} us / {hooks_on * 1e6:.1f} us",
        f"= {(hooks_on - hooks_off) / off * 100:.2f}% of the StartJob p50",
    )
    rate_on, rate_off = statistics.median(rates[True]), statistics.median(rates[False])
    row("stream MB/s, metrics off", f"{rate_off:.0f}", "runs:", [round(r) for r in rates[False]])
    row("stream MB/s, metrics on", f"{rate_on:.0f}", "runs:", [round(r) for r in rates[True]])
    row("stream on / off (target >= 0.95)", f"{rate_on / rate_off:.3f}")
    row(
        f"sampling {options.jobs} jobs from /proc, per 1 s tick",
        f"{proc_cost * 1000:.1f} ms CPU = {proc_cost * 100:.1f}% of a core (target < 5%)",
    )
    row(
        f"sampling {options.jobs} jobs' cgroup files (tmpfs copies)",
        f"{cgroup_cost * 1000:.1f} ms CPU = {cgroup_cost * 100:.1f}% of a core (target < 5%)",
    )


if __name__ == "__main__":
    sys.exit(main())

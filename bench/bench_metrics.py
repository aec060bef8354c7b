"""What observability costs: the metrics plugin on vs off, and usage sampling at scale.

* StartJob p50 over mTLS, servers with and without ``--plugin metrics`` side by side, in
  alternating rounds (targets: within 5%);
* stream MB/s of one follower reading one job's stdout, on vs off, alternating, median;
* sampling 1000 running jobs: the sampling thread's CPU per tick, averaged over a window
  of ticks (the sampler ticks once a second, so that is the share of one core), for the
  ``/proc`` path (1000 real processes, each in its own session, as jobs are) and for the
  cgroup path's file reads (1000 directories of the same files on tmpfs: the host's
  cgroups are hybrid, so this is the read and parse cost, not the kernel's cgroupfs; the
  VM suite covers the real files), each beside the old full-scan sampling, ticks taking
  turns. Target: under 5% of one core. ``--sampling-only`` runs just this (seconds).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
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

from jobworker.backends.local.cgroupfs import JobCgroup
from jobworker.backends.local.sampling import ProcTable, _Tracked, read_small, sample_jobs
from jobworker.client import JobClient
from jobworker.usage import SelfSampling, UsageRing, UsageSample

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

    from jobworker.api.identity import Identity
    from jobworker.hooks.host import Plugins
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


@attrs.frozen
class TickCosts:
    """CPU seconds of the sampling thread per tick: the first (it finds and opens), the
    median of the rest, and their mean: CPU seconds per wall second at the 1 s period."""

    first: float
    median: float
    mean: float

    def show(self) -> str:
        return (
            f"{self.mean * 1000:.1f} ms CPU per s = {self.mean * 100:.1f}% of a core "
            f"(median tick {self.median * 1000:.1f} ms, first {self.first * 1000:.1f} ms)"
        )


def tick_costs(ticks: int, expected: int, **sources: Callable[[], int]) -> dict[str, TickCosts]:
    """``ticks`` ticks of each source, taking turns: a shared machine's load drifts alike
    for all of them, which back-to-back runs do not get (they differ by 20% run to run)."""
    costs: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(ticks):
        for name, tick in sources.items():
            began = time.thread_time()
            found = tick()
            costs[name].append(time.thread_time() - began)
            assert found == expected, f"{name}: sampled {found} of {expected}"
    return {
        name: TickCosts(c[0], statistics.median(c[1:]), statistics.fmean(c[1:]))
        for name, c in costs.items()
    }


# -- the sampling before the kept stat files and slow-field ticks, to compare in one run ----


def baseline(jobs: dict[str, _Tracked]) -> int:
    """``sample_jobs`` as it was: each tick, ``isinstance`` on a runtime protocol per job, all
    five files of every cgroup, and a full ``/proc`` scan reading every process's stat and
    each job process's io, all by path."""
    out = []
    sessions = set()
    for tracked in jobs.values():
        if isinstance(tracked.containment, SelfSampling):
            assert isinstance(tracked.containment, JobCgroup)
            base = f"{tracked.containment.path}/"
            cpu = read_small(base + "cpu.stat")
            io = read_small(base + "io.stat")
            assert cpu is not None and io is not None
            out.append(
                UsageSample(
                    time=time.time(),
                    cpu_usec=int(cpu.split(b"\n", 1)[0].split()[1]),
                    memory_bytes=int(read_small(base + "memory.current") or 0),
                    pids=int(read_small(base + "pids.current") or 0),
                    memory_peak_bytes=int(read_small(base + "memory.peak") or 0),
                    io_read_bytes=sum(int(v) for v in re.findall(rb"rbytes=(\d+)", io)),
                    io_write_bytes=sum(int(v) for v in re.findall(rb"wbytes=(\d+)", io)),
                )
            )
        else:
            sessions.add(tracked.pid)
    if not sessions:
        return len(out)
    found: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        raw = read_small(f"/proc/{pid}/stat")
        if raw is None:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        session = int(fields[3])
        if session not in sessions:
            continue
        t = found.setdefault(session, [0, 0, 0, 0, 0])
        t[0] += sum(int(f) for f in fields[11:15])
        t[1] += int(fields[21])
        t[2] += 1
        raw_io = read_small(f"/proc/{pid}/io")
        if raw_io is not None:
            kv = dict(line.split(b": ", 1) for line in raw_io.splitlines() if b": " in line)
            t[3] += int(kv.get(b"read_bytes", 0))
            t[4] += int(kv.get(b"write_bytes", 0))
    now = time.time()
    out += [UsageSample(now, t[0], t[1], t[2], None, t[3], t[4]) for t in found.values()]
    return len(out)


def sampling(count: int, ticks: int) -> dict[str, TickCosts]:
    """Tick costs of both sources, now and as before (``baseline``), on the same jobs."""
    out: dict[str, TickCosts] = {}
    procs = [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(count)]
    table = ProcTable()
    try:
        by_proc = {f"p{p.pid}": _Tracked(p.pid, None, UsageRing()) for p in procs}
        out.update(
            tick_costs(
                ticks,
                count,
                proc=lambda: len(sample_jobs(by_proc, table)),
                proc_baseline=lambda: baseline(by_proc),
            )
        )
    finally:
        table.close()
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    root = Path("/dev/shm") / f"jobworker-bench-{time.time_ns()}"
    root.mkdir()
    try:
        cgroups = [_fake_cgroup(root / str(i)) for i in range(count)]
        by_cgroup = {f"c{i}": _Tracked(0, c, UsageRing()) for i, c in enumerate(cgroups)}
        out.update(
            tick_costs(
                ticks,
                count,
                cgroup=lambda: len(sample_jobs(by_cgroup, table)),
                cgroup_baseline=lambda: baseline(by_cgroup),
            )
        )
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)
    return out


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--starts", type=int, default=200, help="starts per round")
    p.add_argument("--rounds", type=int, default=2, help="on/off rounds, alternating")
    p.add_argument("--size", type=float, default=0.5, help="GiB per streamed job")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1000, help="running jobs to sample")
    p.add_argument("--ticks", type=int, default=31, help="sampling ticks per source")
    p.add_argument("--sampling-only", action="store_true", help="only the sampling costs")
    options = p.parse_args()
    quick = options.quick
    starts = 50 if quick else options.starts
    size = int((0.125 if quick else options.size) * GiB)
    repeat = 1 if quick else options.repeat
    ticks = 11 if quick else options.ticks
    if options.sampling_only:
        header(f"sampling {options.jobs} jobs, {ticks} ticks per source")
    else:
        header(
            f"metrics on vs off: {starts} x {options.rounds} starts each, "
            f"{size / GiB:g} GiB streams x {repeat}; sampling {options.jobs} jobs"
        )
        with workdir() as work:
            runs = start_latency(work, starts, options.rounds)
            rates = stream_rate(work, size, repeat)
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
        row(
            "stream MB/s, metrics off", f"{rate_off:.0f}", "runs:", [round(r) for r in rates[False]]
        )
        row("stream MB/s, metrics on", f"{rate_on:.0f}", "runs:", [round(r) for r in rates[True]])
        row("stream on / off (target >= 0.95)", f"{rate_on / rate_off:.3f}")
    costs = sampling(options.jobs, ticks)
    for source, what in (("proc", "from /proc"), ("cgroup", "cgroup files (tmpfs copies)")):
        row(f"sampling {options.jobs} jobs {what} (target < 5%)", costs[source].show())
        row("  the same, as before (a full scan each tick)", costs[f"{source}_baseline"].show())


if __name__ == "__main__":
    sys.exit(main())

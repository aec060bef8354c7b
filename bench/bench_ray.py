"""The Ray cluster backend next to the local engine, in the same run: StartJob latency and
output streaming rate.

A local Ray cluster (a head and one worker node, on 127.0.0.1, started as the tests start
theirs) and two servers on this machine: ``jobworker serve`` (the local engine) and
``jobworker serve --plugin ray`` (jobs on the cluster's worker node, through its agent).
The same client measures both over mTLS, in alternating rounds:

* StartJob of ``true`` until it runs: without limits (the agent's round trip), and, on
  the cluster, with ``--cpu 0.1`` (a placement group per job, released when it ends);
* the output of ``head -c SIZE /dev/zero`` followed live from the start, in MB/s;
* with ``--followers N,N,...`` instead (nothing else), the same stream
  followed by N follower processes at once (``_follower.py``, each with its own
  connection, started before the job): total MB/s, every follower's bytes over the time
  until the last one had its last byte;
* SIZE bytes written to the stdin of ``wc -c`` (``WriteInput``, in the CLI's pieces of 256 KiB)
  until the job has them all, in MB/s.

The cluster uses token authentication, as the front requires.

With ``--front-nodes N,N,...`` it measures instead, for clusters of a head and N 1-CPU
worker nodes, the front's start-up (until it answers ``ListJobs``, and until its first look
at the nodes is done: the ``ray_nodes_discovered`` log event) and its idle CPU (the CPU
time of all its threads with no client call, the median of three 10 s windows), next to the local
server's in the same run. ``--front-jobs N,N,...`` adds, on the largest cluster, the idle
CPU with N jobs running (``sleep``, spread over its nodes); the slopes per node and per
running job close the run. ``--baseline-src DIR`` (``git archive REV | tar -x -C DIR``)
runs that version's front and agents too (``PYTHONPATH``, a cluster of its own each),
cluster size by cluster size, for before/after figures from one run.

With ``--fronts`` it measures instead two front servers on one cluster (docs/cluster.md,
"Many front servers"): StartJob of ``true`` through each (every start reserves its slot in
the cluster's ledger), the local server's in the same run; how long after a start through
one front returns the other knows the job (``GetStatus`` until it answers).

Needs the ``ray`` extra. Targets (issue 14): start p50 <= 30 ms, stream >= 50% of local;
(issue 26, ``--followers 1,4 --stream-mib 100``) each >= 70% of local.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
from _common import (
    CLIENT,
    MB,
    MiB,
    add_baseline_option,
    followers,
    header,
    make_pki,
    ms,
    parser,
    percentile,
    row,
    versions,
    workdir,
)

from jobworker.api.pki import PkiPaths
from jobworker.cli.client import INPUT_CHUNK
from jobworker.client import JobClient
from jobworker.errors import NotFound
from jobworker.jobspec import Limits
from jobworker.model import JobState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.ray_cluster.cluster import RAY_ENV, local_cluster, token_auth

JOBWORKER = str(Path(sys.executable).with_name("jobworker"))
#: How long an idle server's CPU time is measured, in how many windows.
IDLE_SECONDS = 10.0
IDLE_WINDOWS = 3


@attrs.frozen
class Served:
    address: str
    pid: int
    log_path: Path
    #: Seconds from its start until it first answered ``ListJobs``.
    answered_after: float


@contextmanager
def serve(
    pki: PkiPaths, work: Path, name: str, *extra: str, env: dict[str, str] | None = None
) -> Iterator[Served]:
    """``jobworker serve`` on a free port until the block exits, once it answers."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    files = pki.server()
    log_path = work / f"{name}.log"
    env = {**os.environ, **RAY_ENV, **(env or {}), "JOBWORKER_HOME": str(work / "home")}
    began = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                JOBWORKER, "serve", "--listen", f"127.0.0.1:{port}", "--log-level", "warning",
                f"--tls-cert={files.cert}", f"--tls-key={files.key}", f"--tls-ca={files.ca}",
                f"--authz={pki.authz}", f"--spool-dir={work / name}", *extra,
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with JobClient(f"127.0.0.1:{port}", pki.client(CLIENT)) as client:
                    client.list()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{log_path.read_text()}") from None
                time.sleep(0.05)  # the figure's resolution: a refused connect is cheap
        yield Served(f"127.0.0.1:{port}", proc.pid, log_path, time.perf_counter() - began)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def timed(action: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        action()
        samples.append(time.perf_counter() - began)
    return samples


def stream_rate(client: JobClient, size: int) -> float:
    """MB/s of following ``head -c size /dev/zero`` from its start to its end."""
    began = time.perf_counter()
    job = client.start("head", ["-c", str(size), "/dev/zero"])
    got = sum(len(data) for _, data, _ in client.stream(job))
    took = time.perf_counter() - began
    assert got == size, (got, size)
    return size / took / MB


def followed_rate(
    served: Served, pki: PkiPaths, client: JobClient, size: int, count: int, relay: bool = False
) -> float:
    """Total MB/s of ``count`` follower processes following ``head -c size /dev/zero``
    (``relay``: through the front, not from the job's node: docs/cluster.md, "Direct
    output")."""
    group = followers(served.address, pki, count, relay=relay)
    try:
        began = group.go(client.start("head", ["-c", str(size), "/dev/zero"]))
        results = group.results()
    finally:
        group.kill()
    assert all(r["bytes"] == size for r in results), results
    last = max(began + r["seconds"] for r in results)  # each counts from its own call
    return count * size / (last - began) / MB


def stdin_rate(client: JobClient, size: int) -> float:
    """MB/s of writing ``size`` bytes to ``wc -c``'s stdin, until it counted them all."""
    piece = bytes(INPUT_CHUNK)
    job = client.start("wc", ["-c"], stdin=True)
    began = time.perf_counter()
    result = client.write_input(job, (piece for _ in range(size // len(piece))))
    got = b"".join(data for _, data, _ in client.stream(job))
    took = time.perf_counter() - began
    assert result.written == size and got == f"{size}\n".encode(), (result, got)
    return size / took / MB


def measure(
    clients: dict[str, JobClient], starts: int, size: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Both servers in alternation, round by round, so that they share the machine's
    noise (other work on a busy host moves every figure)."""
    found: dict[str, dict[str, list[float]]] = {
        kind: {"start": [], "start_cpu": [], "stream": [], "stdin": []} for kind in clients
    }
    for client in clients.values():
        for _ in range(10):  # warm-up: connections, code paths, the spawn helper
            client.start("true")
    for _ in range(rounds):
        for kind, client in clients.items():
            found[kind]["start"] += timed(lambda c=client: c.start("true"), starts // rounds)
            if kind == "ray":  # the local engine refuses limits without a containment plugin
                found[kind]["start_cpu"] += timed(
                    lambda c=client: c.start("true", limits=Limits(cpu=0.1)), starts // rounds // 2
                )
            found[kind]["stream"].append(stream_rate(client, size))
            found[kind]["stdin"].append(stdin_rate(client, size))
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` so far: the sum over its threads of the scheduler's
    nanosecond count (``/proc/PID/task/*/schedstat``; clock ticks are too coarse for
    a fraction of a millisecond per second)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def idle_cpu(pid: int) -> float:
    """CPU milliseconds per second that server ``pid`` spends while no client calls it:
    the median of ``IDLE_WINDOWS`` windows (a burst of the machine's other work lands in
    one)."""
    rates = []
    for _ in range(IDLE_WINDOWS):
        before = cpu_seconds(pid)
        time.sleep(IDLE_SECONDS)
        rates.append((cpu_seconds(pid) - before) / IDLE_SECONDS * 1000)
    return sorted(rates)[len(rates) // 2]


def run_sleepers(client: JobClient, count: int) -> None:
    """Start jobs until ``count`` run (``sleep``, left to the front's SIGTERM)."""
    running = len(client.list(state=JobState.RUNNING))
    for _ in range(count - running):
        client.start("sleep", ["3600"])


def front_scale(sizes: list[int], jobs: list[int], baseline: Path | None) -> None:
    """Front start-up and idle CPU for clusters of ``sizes`` worker nodes (and, on the
    largest, with ``jobs`` running), the local server's in the same run; with
    ``baseline``, that version's front beside this one's, size by size."""
    header(f"Ray front start-up and idle CPU for {sizes} worker nodes, {jobs} jobs")
    idle: dict[str, dict[int, float]] = {}
    per_jobs: dict[str, dict[int, float]] = {}
    with workdir() as work:
        pki = make_pki(work / "pki")
        auth = token_auth(work / "ray-token")
        with serve(pki, work, "local") as local:
            row("local: answers after", ms(local.answered_after),
                f"idle CPU {idle_cpu(local.pid):.2f} ms/s")  # fmt: skip
        for n in sizes:
            for name, src in versions(baseline):
                env = {**auth, **({} if src is None else {"PYTHONPATH": str(src)})}
                nodes = [{"name": "head", "num_cpus": 0, "memory": 1 << 30}]
                nodes += [{"name": f"w{i}", "num_cpus": 1, "memory": 1 << 30} for i in range(n)]
                tag = f"{name}-{n}".replace(" ", "-")
                with local_cluster(nodes, work / f"ray-{tag}.log", env=env) as cluster:
                    ray_args = ("--plugin", "ray", f"--ray-address={cluster.address}")
                    began = time.perf_counter()
                    with (
                        serve(pki, work, f"front-{tag}", *ray_args, "--log-level", "info",
                              env=env) as front,
                        JobClient(front.address, pki.client(CLIENT)) as client,
                    ):  # fmt: skip
                        while '"ray_nodes_discovered"' not in front.log_path.read_text():
                            time.sleep(0.05)
                        discovered = time.perf_counter() - began
                        idle.setdefault(name, {})[n] = idle_cpu(front.pid)
                        row(f"{name}, {n} nodes: answers after", ms(front.answered_after),
                            f"all nodes found after {ms(discovered)}",
                            f"idle CPU {idle[name][n]:.2f} ms/s")  # fmt: skip
                        if n != max(sizes):
                            continue
                        for count in jobs:
                            run_sleepers(client, count)
                            time.sleep(2)  # the starts' own traffic settles
                            per_jobs.setdefault(name, {})[count] = cpu = idle_cpu(front.pid)
                            row(f"{name}, {n} nodes, {count} jobs running",
                                f"idle CPU {cpu:.2f} ms/s")  # fmt: skip
    for name, by_size in idle.items():
        if len(sizes) > 1:
            lo, hi = min(sizes), max(sizes)
            slope = (by_size[hi] - by_size[lo]) / (hi - lo)
            row(f"{name}: idle CPU per node", f"{slope * 1000:.0f} us/s")
        by_count = per_jobs.get(name, {})
        if len(by_count) > 1:
            lo, hi = min(by_count), max(by_count)
            slope = (by_count[hi] - by_count[lo]) / (hi - lo)
            row(f"{name}: idle CPU per running job", f"{slope * 1000:.1f} us/s")


def stream_only(size: int, counts: list[int], rounds: int) -> None:
    """The stream with each number of followers in ``counts``, local server and front
    alternating round by round; best and median total MB/s and the front's share."""
    header(f"output stream: {rounds} rounds of {size // MiB} MiB, followers {counts}")
    found: dict[tuple[str, int], list[float]] = {}
    with cluster_and_servers() as (pki, servers, clients):
        for _ in range(rounds):
            for count in counts:
                for kind in servers:
                    rate = followed_rate(servers[kind], pki, clients[kind], size, count)
                    found.setdefault((kind, count), []).append(rate)
    for count in counts:
        best = {kind: max(found[kind, count]) for kind in ("local", "ray")}
        for kind in ("local", "ray"):
            rates = sorted(found[kind, count])
            row(f"{count} follower(s), {kind}: MB/s total", f"best {best[kind]:.0f}",
                f"median {rates[len(rates) // 2]:.0f}")  # fmt: skip
        share = best["ray"] / best["local"]
        row(f"{count} follower(s): ray / local (best)", f"{share:.0%}",
            "target >= 70%: " + ("met" if share >= 0.7 else "NOT met"))  # fmt: skip


@contextmanager
def cluster_and_servers(
    fronts: tuple[str, ...] = ("ray",),
) -> Iterator[tuple[PkiPaths, dict[str, Served], dict[str, JobClient]]]:
    """A head and a 2-CPU worker node, a local server and a front of each name in
    ``fronts`` on the cluster, and a client of each (by name; ``local`` first)."""
    nodes = [
        {"name": "head", "num_cpus": 0, "memory": 1 << 30},
        {"name": "worker", "num_cpus": 2, "memory": 4 << 30},
    ]
    with workdir() as work, contextlib.ExitStack() as stack:
        pki = make_pki(work / "pki")
        auth = token_auth(work / "ray-token")
        cluster = stack.enter_context(local_cluster(nodes, work / "ray.log", env=auth))
        ray_args = ("--plugin", "ray", f"--ray-address={cluster.address}")
        servers = {"local": stack.enter_context(serve(pki, work, "local"))}
        for name in fronts:
            servers[name] = stack.enter_context(serve(pki, work, name, *ray_args, env=auth))
        clients = {
            name: stack.enter_context(JobClient(served.address, pki.client(CLIENT)))
            for name, served in servers.items()
        }
        yield pki, servers, clients


def known_after(started_through: JobClient, other: JobClient) -> float:
    """Seconds from a start's answer through one front until the other knows the job."""
    job = started_through.start("true")
    began = time.perf_counter()
    while True:
        try:
            other.status(job)
        except NotFound:
            continue
        return time.perf_counter() - began


def two_fronts(starts: int, rounds: int) -> None:
    """StartJob through each of two fronts on one cluster, the local server's in the same
    run, rounds alternating; how soon the other front knows a job."""
    header(f"two front servers on one cluster: {starts} starts each, {rounds} rounds")
    found: dict[str, list[float]] = {"local": [], "front a": [], "front b": [], "known": []}
    with cluster_and_servers(("front a", "front b")) as (_, _, clients):
        for client in clients.values():
            for _ in range(10):  # warm-up
                client.start("true")
        for _ in range(rounds):
            for kind, client in clients.items():
                found[kind] += timed(lambda c=client: c.start("true"), starts // rounds)
            for _ in range(starts // rounds):
                found["known"].append(known_after(clients["front a"], clients["front b"]))
    for kind in ("local", "front a", "front b"):
        samples = found[kind]
        row(f"StartJob `true` ({kind})", f"p50 {ms(percentile(samples, 0.5))}",
            f"p99 {ms(percentile(samples, 0.99))}")  # fmt: skip
    known = found["known"]
    row("a start through a: known to b after", f"p50 {ms(percentile(known, 0.5))}",
        f"p99 {ms(percentile(known, 0.99))}")  # fmt: skip


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--starts", type=int, default=200)
    p.add_argument("--stream-mib", type=int, default=256)
    p.add_argument("--front-nodes", help="N,N,...: measure front start-up and idle CPU only")
    p.add_argument("--front-jobs", default="", help="N,N,...: and idle CPU with N jobs running")
    add_baseline_option(p)
    p.add_argument("--followers", help="N,N,...: measure only the stream, with N followers")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fronts", action="store_true", help="measure two fronts on one cluster")
    options = p.parse_args()
    if options.fronts:
        two_fronts(60 if options.quick else options.starts, options.rounds)
        return
    if options.front_nodes:
        sizes = [int(n) for n in options.front_nodes.split(",")]
        jobs = [int(n) for n in options.front_jobs.split(",") if n]
        front_scale(sizes, jobs, options.baseline_src)
        return
    size = (64 if options.quick else options.stream_mib) * MiB
    rounds = options.rounds
    if options.followers:
        stream_only(size, [int(n) for n in options.followers.split(",")], rounds)
        return
    starts = 60 if options.quick else options.starts
    header(f"Ray backend vs local engine: {starts} starts, {rounds} x {size // MiB} MiB streams")
    with cluster_and_servers() as (_, _, clients):
        results = measure(clients, starts, size, rounds)
    for kind in ("local", "ray"):
        for key, label in (("start", "StartJob `true`"), ("start_cpu", "StartJob --cpu 0.1")):
            if not results[kind][key]:
                continue
            samples = results[kind][key]
            row(f"{label} ({kind})", f"p50 {ms(percentile(samples, 0.5))}",
                f"p99 {ms(percentile(samples, 0.99))}")  # fmt: skip
        for key in ("stream", "stdin"):
            rates = results[kind][key]
            row(f"{key} MB/s ({kind})", f"best {max(rates):.0f}",
                f"median {sorted(rates)[len(rates) // 2]:.0f}")  # fmt: skip
    local_rate, ray_rate = max(results["local"]["stream"]), max(results["ray"]["stream"])
    row("stream ray / local (best)", f"{ray_rate / local_rate:.0%}")
    stdin_ratio = max(results["ray"]["stdin"]) / max(results["local"]["stdin"])
    row("stdin ray / local (best)", f"{stdin_ratio:.0%}")
    p50 = percentile(results["ray"]["start"], 0.5)
    row("target: ray start p50 <= 30 ms", ms(p50), "met" if p50 <= 0.030 else "NOT met")
    row("target: ray stream >= 50% of local", "met" if ray_rate >= local_rate / 2 else "NOT met")


if __name__ == "__main__":
    main()

"""The Ray backend as the cluster grows: what a front costs at N worker nodes, next to a
local server measured in the same run.

For each N of ``--nodes`` (default 1,8,32) a new local cluster (a head with no CPU and N
1-CPU worker nodes, token authentication on, every port on 127.0.0.1, the tests' cluster
keeper) and a front on it (``jobworker serve --plugin ray``); the local server
(``jobworker serve``) runs throughout and is measured beside each cluster (so that both
share the machine's load, the cluster's own included). For each server, in this order:

* start-up: from the process's start until it answers ``ListJobs`` (a new TLS client
  every 0.05 s), and for a front until its first look at the nodes is done
  (``ray_nodes_discovered``);
* idle CPU (the server process's threads' CPU time, median of three 10 s windows, no job);
* StartJob of ``true`` with 1 client, then with 8 clients at once (p50/p99 of each call),
  and how many nodes took any of those jobs;
* ``--running`` ``sleep`` jobs running together: idle CPU again (the per-job slope),
  GetStatus p99 over random jobs, ListJobs p50 of the whole table;
* a ``--stream-mb`` MB stream (``head -c``) followed from its start by 1, then 4 follower
  processes (MB/s in total), reading from the job's node (direct output, what clients do
  by default), then relayed through the front (``JobClient(direct_output=False)``);
* per node: the resident memory of the cluster's processes (Ray's and the agents), over
  its nodes.

At the end, the slopes: front idle CPU per node (between the smallest and the largest N)
and per running job. Needs the ``ray`` extra and memory: about 300 MB per node.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import (
    CLIENT,
    MB,
    header,
    make_pki,
    ms,
    parser,
    percentile,
    proc_status,
    row,
    workdir,
)
from bench_ray import Served, followed_rate, idle_cpu, serve, timed

from jobworker.api.pki import PkiPaths
from jobworker.client import JobClient
from tests.ray_cluster.cluster import descendants, local_cluster, token_auth

#: Calls per StartJob measure (for each of 1 and 8 clients).
STARTS = 200
CLIENTS = 8


def p50_p99(samples: list[float]) -> str:
    return f"{ms(percentile(samples, 0.5))} / {ms(percentile(samples, 0.99))}"


def starts(address: str, pki: PkiPaths, clients: int) -> tuple[list[float], list[str]]:
    """StartJob ``true`` latencies with ``clients`` clients at once, and the job ids."""
    per_client = STARTS // clients

    def one_client(_: int) -> tuple[list[float], list[str]]:
        jobs: list[str] = []
        with JobClient(address, pki.client(CLIENT)) as client:
            client.list()
            samples = timed(lambda: jobs.append(client.start("true")), per_client)
        return samples, jobs

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one_client, range(clients)))
    return [s for r in results for s in r[0]], [j for r in results for j in r[1]]


def measure(label: str, served: Served, pki: PkiPaths, running: int, size: int) -> dict[str, float]:
    """Every figure of one server; rows are printed as they come."""
    found: dict[str, float] = {}
    address, pid = served.address, served.pid
    with JobClient(address, pki.client(CLIENT)) as client:
        for _ in range(10):  # warm-up: connections, code paths, the agents' spawn helpers
            client.start("true")
        found["idle"] = idle_cpu(pid)
        row(f"{label}: idle CPU", f"{found['idle']:.1f} ms/s")
        for clients in (1, CLIENTS):
            samples, jobs = starts(address, pki, clients)
            nodes = {client.status(j).node for j in jobs[:: max(1, len(jobs) // 50)]}
            found[f"start{clients}_p50"] = percentile(samples, 0.5)
            row(f"{label}: StartJob true, {clients} client(s)", f"p50/p99 {p50_p99(samples)}",
                f"nodes used (of a sample of 50 jobs): {len(nodes - {''})}")  # fmt: skip
        sleepers: list[str] = []
        with ThreadPoolExecutor(CLIENTS) as pool:
            sleepers = list(pool.map(lambda _: client.start("sleep", ["3600"]), range(running)))
        try:
            time.sleep(2)  # the starts' own work done
            busy = idle_cpu(pid)
            found["per_job"] = (busy - found["idle"]) / running * 1000  # µs/s per job
            row(f"{label}: idle CPU, {running} running jobs", f"{busy:.1f} ms/s",
                f"{found['per_job']:.1f} µs/s per running job")  # fmt: skip
            status = timed(lambda: client.status(random.choice(sleepers)), 200)
            listing = timed(client.list, 10)
            table = len(client.list())
            row(f"{label}: GetStatus p50/p99", p50_p99(status),
                f"ListJobs ({table} jobs) p50 {ms(percentile(listing, 0.5))}")  # fmt: skip
        finally:
            with ThreadPoolExecutor(CLIENTS) as pool:
                list(pool.map(lambda j: client.stop(j, grace=0), sleepers))
        for count in (1, 4):
            for relay, how in ((False, ""), (True, ", relayed")):
                rate = followed_rate(served, pki, client, size, count, relay)
                found[f"stream{count}{how}"] = rate
                row(f"{label}: {size // MB} MB stream, {count} follower(s){how}",
                    f"{rate:.0f} MB/s total")  # fmt: skip
    return found


def rss_per_node(keeper_pid: int, nodes: int) -> float:
    """Resident bytes of every process of the cluster, over its nodes."""
    total = 0
    for pid in descendants(keeper_pid):
        try:
            total += proc_status(pid)["VmRSS"]
        except (FileNotFoundError, KeyError, ProcessLookupError):
            continue
    return total / nodes


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--nodes", default="1,8,32", help="N,N,...: worker node counts")
    p.add_argument("--running", type=int, default=200, help="sleeping jobs for the slopes")
    p.add_argument("--stream-mb", type=int, default=100)
    options = p.parse_args()
    sizes = [int(n) for n in options.nodes.split(",")]
    running = 40 if options.quick else options.running
    size = (20 if options.quick else options.stream_mb) * MB
    header(f"Ray front at {sizes} worker nodes, next to a local server ({running} running jobs)")
    figures: dict[str, dict[str, float]] = {}
    with workdir() as work:
        pki = make_pki(work / "pki")
        auth = token_auth(work / "ray-token")
        limits = ("--max-jobs", str(running + STARTS * 2))
        with serve(pki, work, "local", *limits) as local:
            row("local: answers after", ms(local.answered_after))
            for n in sizes:
                nodes = [{"name": "head", "num_cpus": 0, "memory": 1 << 30}]
                nodes += [{"name": f"w{i}", "num_cpus": 1, "memory": 1 << 30} for i in range(n)]
                began = time.perf_counter()
                with local_cluster(nodes, work / f"ray-{n}.log", env=auth) as cluster:
                    row(f"N={n}: cluster up after", ms(time.perf_counter() - began))
                    args = ("--plugin", "ray", f"--ray-address={cluster.address}", *limits)
                    began = time.perf_counter()
                    with serve(pki, work, f"front-{n}", *args, "--log-level", "info",
                               env=auth) as front:  # fmt: skip
                        log = Path(front.log_path)
                        while '"ray_nodes_discovered"' not in log.read_text():
                            time.sleep(0.05)
                        row(f"N={n}: front answers after", ms(front.answered_after),
                            f"all nodes found after {ms(time.perf_counter() - began)}")  # fmt: skip
                        # The local server beside the same cluster: the same machine load.
                        label = f"local, N={n}"
                        figures[label] = measure(label, local, pki, running, size)
                        label = f"N={n}"
                        figures[label] = measure(label, front, pki, running, size)
                        per_node = rss_per_node(cluster.keeper_pid, n + 1)
                        row(f"N={n}: cluster memory per node", f"{per_node / 2**20:.0f} MiB RSS")
    summary(figures, sizes)


def summary(figures: dict[str, dict[str, float]], sizes: list[int]) -> None:
    header("Summary (ratios against the local server beside the same cluster)")
    for n in sizes:
        f, local = figures[f"N={n}"], figures[f"local, N={n}"]
        row(f"N={n}: StartJob p50, 1 / 8 clients, vs local",
            f"{f['start1_p50'] / local['start1_p50']:.2f}x",
            f"{f['start8_p50'] / local['start8_p50']:.2f}x")  # fmt: skip
        for how in ("", ", relayed"):
            one = f[f"stream1{how}"] / local["stream1"]
            four = f[f"stream4{how}"] / local["stream4"]
            row(f"N={n}: stream 1 / 4 followers{how}, vs local", f"{one:.0%}", f"{four:.0%}")
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        slope = (figures[f"N={large}"]["idle"] - figures[f"N={small}"]["idle"]) / (large - small)
        row("front idle CPU per node", f"{slope:.2f} ms/s per node")
    per_job = [figures[f"N={n}"]["per_job"] for n in sizes]
    row("front CPU per running job", f"{sorted(per_job)[len(per_job) // 2]:.1f} µs/s (median)")
    largest, local = figures[f"N={sizes[-1]}"], figures[f"local, N={sizes[-1]}"]
    row(f"targets at N={sizes[-1]}: idle < 10 ms/s", f"{largest['idle']:.1f}",
        "met" if largest["idle"] < 10 else "NOT met")  # fmt: skip
    ratio = largest["start1_p50"] / local["start1_p50"]
    row("StartJob p50 within 2x of local", f"{ratio:.2f}x", "met" if ratio <= 2 else "NOT met")
    stream = min(largest["stream1"] / local["stream1"], largest["stream4"] / local["stream4"])
    row("stream >= 70% of local (direct output)", f"{stream:.0%}",
        "met" if stream >= 0.7 else "NOT met")  # fmt: skip


if __name__ == "__main__":
    main()

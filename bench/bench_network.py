"""Private job networks: what they add to a job's start, and to a download from outside.

Starts: the local engine (``JobManager``, zygote, isolation as root) starts ``true`` with
``--network private``, ``none`` and ``host`` in alternating rounds; a start is timed
until the command runs (``manager.start`` returns after its exec), and until the job's
end is known (``manager.wait``: what a client running a command waits for too).
Download: a server in a network namespace the bench creates (a veth pair from the host,
198.51.100.0/30 of TEST-NET-2) sends 1 GiB to a job, once per network and round; the
job reads it to EOF and prints the bytes and seconds it measured itself. The same
download by a process on the host is the ceiling. Root only.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import header, ms, parser, percentile, row, workdir

from jobworker.backends.local.manager import JobManager
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec, Network
from jobworker.logconfig import configure_logging
from jobworker.model import Stream
from jobworker.plugins.isolation import Isolation

NETWORKS = (Network.PRIVATE, Network.NONE, Network.HOST)
PORT = 8080
SENDER = f"""
import socket, sys
size = int(sys.argv[1])
block = bytes(1 << 20)
server = socket.create_server(("0.0.0.0", {PORT}))
print("up", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        for _ in range(size // len(block)):
            conn.sendall(block)
"""
RECEIVER = """
import socket, sys, time
began = time.perf_counter()
got = 0
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as conn:
    while chunk := conn.recv(1 << 20):
        got += len(chunk)
print(got, time.perf_counter() - began)
"""


class Outside:
    """A namespace behind a veth pair, with the sender in it; removed on exit."""

    def __init__(self, size: int) -> None:
        tag = os.getpid() % 60000
        self.namespace, self.host_if = f"jwb-out-{tag}", f"jwbh{tag}"
        self.address = "198.51.100.254"
        self._size = size
        self._sender: subprocess.Popen[str] | None = None

    def __enter__(self) -> Outside:
        try:
            self._ip("netns", "add", self.namespace)
            self._ip(
                "link",
                "add",
                self.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                self.namespace,
            )
            self._ip("addr", "add", "198.51.100.253/30", "dev", self.host_if)
            self._ip("link", "set", self.host_if, "up")
            inside = ("-n", self.namespace)
            self._ip(*inside, "addr", "add", f"{self.address}/30", "dev", "eth0")
            self._ip(*inside, "link", "set", "eth0", "up")
            self._ip(*inside, "route", "add", "default", "via", "198.51.100.253")
            self._sender = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.namespace,
                    sys.executable,
                    "-c",
                    SENDER,
                    str(self._size),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self._sender.stdout is not None
            if self._sender.stdout.readline() != "up\n":
                raise RuntimeError("the sender did not start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._sender is not None:
            self._sender.kill()
            self._sender.communicate()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, check=False)

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)


def manager_for(network: Network, spool: Path) -> JobManager:
    plugins = Plugins()
    plugins.register(Isolation(network=network), name="isolation")
    return JobManager(plugins, spool)


async def start_round(manager: JobManager, starts: int) -> list[tuple[float, float]]:
    """Seconds until the command runs, and until the job's end is known, per start."""
    samples = []
    for _ in range(starts):
        began = time.perf_counter()
        job = await manager.start(JobSpec("true"), "bench")
        started = time.perf_counter() - began
        await manager.wait(job.job_id)
        samples.append((started, time.perf_counter() - began))
    return samples


async def download(manager: JobManager, outside: Outside) -> float:
    """MB/s the job measured."""
    args = ("-c", RECEIVER, outside.address, str(PORT))
    job = await manager.start(JobSpec("python3", args), "bench")
    out = b"".join([c.data async for c in manager.follow(job.job_id) if c.stream is Stream.STDOUT])
    await manager.wait(job.job_id)
    got, seconds = out.split()
    return int(got) / float(seconds) / 1e6


def host_download(outside: Outside) -> float:
    out = subprocess.run(
        [sys.executable, "-c", RECEIVER, outside.address, str(PORT)],
        capture_output=True,
        check=True,
    ).stdout
    got, seconds = out.split()
    return int(got) / float(seconds) / 1e6


async def run(starts: int, rounds: int, size: int, spool: Path) -> None:
    """The starts, then (unless ``size`` is 0) the downloads."""
    managers = {n: manager_for(n, spool / n.value) for n in NETWORKS}
    for n in NETWORKS:
        (spool / n.value).mkdir()
    latency: dict[Network, list[tuple[float, float]]] = {n: [] for n in NETWORKS}
    speed: dict[str, list[float]] = {"host process": []}
    speed.update({n.value: [] for n in (Network.PRIVATE, Network.HOST)})
    try:
        for manager in managers.values():
            await start_round(manager, 3)  # the zygote and first-time costs
        for _ in range(rounds):
            for n in NETWORKS:
                latency[n] += await start_round(managers[n], starts // rounds)
        for index, title in enumerate(("start: until the command runs", "until its end is known")):
            header(f"{title}: `true`")
            p50 = {n: percentile([s[index] for s in latency[n]], 0.5) for n in NETWORKS}
            for n in NETWORKS:
                p99 = percentile([s[index] for s in latency[n]], 0.99)
                row(
                    f"--network {n.value} ({len(latency[n])} starts)",
                    "p50",
                    ms(p50[n]),
                    "p99",
                    ms(p99),
                )
            row("private adds (p50, against none)", ms(p50[Network.PRIVATE] - p50[Network.NONE]))
        if not size:
            return
        with Outside(size) as outside:
            for _ in range(rounds):
                speed["host process"].append(host_download(outside))
                for n in (Network.PRIVATE, Network.HOST):
                    speed[n.value].append(await download(managers[n], outside))
        header(f"download of {size >> 20} MiB from a namespace outside, MB/s (median of {rounds})")
        ceiling = percentile(speed["host process"], 0.5)
        for name, values in speed.items():
            median = percentile(values, 0.5)
            row(name, f"{median:.0f} MB/s", f"({median / ceiling:.2f} of the host's)")
    finally:
        for manager in managers.values():
            await manager.shutdown()


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--starts", type=int, default=300, help="per network, over all rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size-mib", type=int, default=1024, help="0: no download, starts only")
    options = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_network: needs root (network namespaces, a veth pair)")
    starts = 60 if options.quick else options.starts
    size = (min(256, options.size_mib) if options.quick else options.size_mib) << 20
    configure_logging("error", json=True)
    with workdir() as work:
        asyncio.run(run(starts, options.rounds, size, work))


if __name__ == "__main__":
    main()

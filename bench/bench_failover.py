"""How long ``jobworker run`` stalls when the cluster front it follows through goes away.

A local Ray cluster (a head and one worker node, as bench_ray.py starts it), a standby
front, and for each round a fresh front listed first (``--server USED,STANDBY``:
``pick_first`` keeps to it). ``jobworker run`` follows a job that writes a numbered line
every 10 ms; after a second the used front gets SIGTERM (it stops none of the cluster's
jobs; its followers get UNAVAILABLE) or SIGKILL, and ``run`` resumes through the standby
from its offset. Reported per signal, over the rounds:

* signal -> resumed: from the signal until ``run`` says ``resumed at offset N`` (it says so
  just before it writes the first chunk from the standby);
* longest pause: the longest time between two reads of ``run``'s stdout from a second
  before the signal to a second after the resume;

and, as the baseline in the same run, the longest pause of a round without a signal.
Each round checks the lines ``run`` printed: 1..n, each once. The job is then stopped
through the standby.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import attrs
from _common import CLIENT, header, make_pki, ms, parser, percentile, row, workdir
from bench_ray import JOBWORKER, serve

from jobworker.api.pki import PkiPaths
from jobworker.client import JobClient
from jobworker.model import JobState
from tests.ray_cluster.cluster import local_cluster, token_auth

#: A numbered line every 10 ms, for ever (stopped by the bench).
COUNTING = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.01; done"


@attrs.define
class Watched:
    """A ``jobworker run`` process, its stdout's reads and its stderr's lines, timed."""

    process: subprocess.Popen[bytes]
    reads: list[tuple[float, bytes]] = attrs.Factory(list)
    said: list[tuple[float, str]] = attrs.Factory(list)

    def start_readers(self) -> None:
        def stdout() -> None:
            assert self.process.stdout is not None
            while data := os.read(self.process.stdout.fileno(), 1 << 16):
                self.reads.append((time.perf_counter(), data))

        def stderr() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.said.append((time.perf_counter(), line.decode(errors="replace")))

        for target in (stdout, stderr):
            threading.Thread(target=target, daemon=True).start()

    def when(self, words: str, timeout: float) -> float:
        """When ``run`` said ``words`` on stderr (waiting up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in self.said:
                if words in line:
                    return at
            time.sleep(0.01)
        raise RuntimeError(f"run did not say {words!r}: {self.said}")

    def longest_pause(self, since: float, until: float) -> float:
        times = [at for at, _ in self.reads if since <= at <= until]
        return max((b - a for a, b in itertools.pairwise(times)), default=until - since)

    def lines(self) -> list[bytes]:
        return b"".join(data for _, data in self.reads).splitlines()


def one_round(pki: PkiPaths, work: Path, auth: dict[str, str], address: str,
              standby: JobClient, standby_address: str, n: int,
              signum: int | None) -> tuple[float, float]:  # fmt: skip
    """(signal -> resumed, longest pause) of one round; without a signal, (0, the pause
    over the same span as a failover's)."""
    # The used front relays: with direct output (the default) run reads from the job's
    # node and the front's end does not touch the stream until the job's status.
    ray_args = ("--plugin", "ray", f"--ray-address={address}", "--no-ray-direct-output")
    with serve(pki, work, f"used-{n}", *ray_args, env=auth) as used:
        files = pki.client(CLIENT)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("JOBWORKER_")},
            "JOBWORKER_HOME": str(work / "client-home"),
            "JOBWORKER_SERVER": f"{used.address},{standby_address}",
            "JOBWORKER_TLS_CERT": str(files.cert),
            "JOBWORKER_TLS_KEY": str(files.key),
            "JOBWORKER_TLS_CA": str(files.ca),
        }
        watched = Watched(subprocess.Popen(
            [JOBWORKER, "run", "--", "sh", "-c", COUNTING], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ))  # fmt: skip
        watched.start_readers()
        try:
            deadline = time.monotonic() + 60
            while len(watched.reads) < 10:  # started, and following through `used`
                if watched.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"round {n}: run did not start: {watched.said}\n"
                                       f"{used.log_path.read_text()[-3000:]}")  # fmt: skip
                time.sleep(0.05)
            time.sleep(1.0)
            signalled = time.perf_counter()
            if signum is None:
                time.sleep(1.0)
                resumed = pause_end = time.perf_counter()
            else:
                os.kill(used.pid, signum)
                resumed = watched.when("resumed at offset", 120)
                pause_end = resumed + 1.0
                time.sleep(1.0)
            pause = watched.longest_pause(signalled - 1.0, pause_end)
        finally:
            for job in standby.list(state=JobState.RUNNING):
                standby.stop(job.job_id, grace=0)
            watched.process.wait(60)
    lines = watched.lines()
    if lines != [b"%d" % i for i in range(1, len(lines) + 1)]:
        raise RuntimeError(f"round {n}: run's lines are not 1..{len(lines)} once each")
    return resumed - signalled, pause


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=5, help="rounds per signal")
    options = p.parse_args()
    rounds = 2 if options.quick else options.rounds
    header(f"run following through a front that goes away: {rounds} rounds per signal")
    nodes = [
        {"name": "head", "num_cpus": 0, "memory": 1 << 30},
        {"name": "worker", "num_cpus": 2, "memory": 4 << 30},
    ]
    kinds: dict[str, int | None] = {
        "no signal": None, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL
    }  # fmt: skip
    found: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    with workdir() as work:
        pki = make_pki(work / "pki")
        auth = token_auth(work / "ray-token")
        with (
            local_cluster(nodes, work / "ray.log", env=auth) as cluster,
            serve(
                pki,
                work,
                "standby",
                "--plugin",
                "ray",
                f"--ray-address={cluster.address}",
                env=auth,
            ) as standby,  # fmt: skip
            JobClient(standby.address, pki.client(CLIENT)) as client,
        ):
            n = 0
            for _ in range(rounds):
                for kind, signum in kinds.items():
                    n += 1
                    found[kind].append(one_round(pki, work, auth, cluster.address, client,
                                                 standby.address, n, signum))  # fmt: skip
    for kind, samples in found.items():
        pauses = [pause for _, pause in samples]
        if kinds[kind] is not None:
            resumed = [took for took, _ in samples]
            row(f"{kind}: signal -> resumed", f"p50 {ms(percentile(resumed, 0.5))}",
                f"max {ms(max(resumed))}")  # fmt: skip
        row(f"{kind}: longest pause of run's output", f"p50 {ms(percentile(pauses, 0.5))}",
            f"max {ms(max(pauses))}")  # fmt: skip


if __name__ == "__main__":
    main()

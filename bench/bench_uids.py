"""One uid per job: what drawing a uid, emptying its keyrings and one sized tmpfs cost a
start, and what a uid's reuse checks cost (needs root).

``JobManager.start`` of ``true`` until it runs, without gRPC, isolated as a client without
``run_as`` gets it (a uid of its own) against the same server with ``--job-user nobody``
(one shared account: no uid drawn, no keyring emptied), alternating run by run in the same
process. Then the checks a released uid waits for (:func:`jobworker.backends.local.uids.leftovers`:
one ``/proc`` scan, one walk of the writable directories): for one uid (a job ended) and
for the whole default range (a server starting), with this host's processes.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from _common import header, ms, parser, percentile, row, workdir

from jobworker.backends.local.manager import JobManager
from jobworker.backends.local.uids import DEFAULT_RANGE, UidRange, leftovers
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.logconfig import configure_logging
from jobworker.plugins.isolation import Isolation


async def starts(spool: Path, count: int, shared_user: str | None) -> list[float]:
    spool.mkdir()
    plugins = Plugins()
    isolation = Isolation(default_user=shared_user)
    plugins.register(isolation, name="isolation")
    plugins.load([])
    manager = JobManager(plugins, spool, retain_finished=count + 100)
    samples = []
    try:
        for i in range(count + 10):
            began = time.perf_counter()
            status = await manager.start(JobSpec("true"), owner="bench")
            if i >= 10:  # warm-up: the zygote and the uid pool start on first use
                samples.append(time.perf_counter() - began)
            await manager.wait(status.job_id)
    finally:
        await manager.shutdown()
        isolation.jobworker_shutdown()
    return samples


def checks(uids: set[int], writable: list[str], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        leftovers(uids, writable)
        samples.append(time.perf_counter() - began)
    return samples


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench_uids: switching jobs to their uids needs root")
    p = parser(__doc__ or "")
    p.add_argument("--starts", type=int, default=200)
    p.add_argument("--rounds", type=int, default=4, help="alternations of the two servers")
    options = p.parse_args()
    count = 50 if options.quick else options.starts
    configure_logging("warning")
    header(f"uid per job: {options.rounds} x {count} sequential JobManager.start('true')")
    own: list[float] = []
    shared: list[float] = []
    with workdir() as work:
        for n in range(options.rounds):
            shared += asyncio.run(starts(work / f"shared-{n}", count, "nobody"))
            own += asyncio.run(starts(work / f"own-{n}", count, None))
        full = set(UidRange.parse(DEFAULT_RANGE))
        processes = sum(1 for name in os.listdir("/proc") if name.isdigit())
        one = checks({full.pop()}, [str(work)], 20)
        every = checks(full, [str(work)], 5)
    for label, samples in (
        ("start, --job-user nobody (shared)", shared),
        ("start, a uid of its own (default)", own),
    ):
        row(label, f"p50 {ms(percentile(samples, 0.5))}", f"p95 {ms(percentile(samples, 0.95))}")
    row("own / shared (p50)", f"{percentile(own, 0.5) / percentile(shared, 0.5):.2f}x")
    row(f"reuse checks, 1 uid ({processes} processes)", f"p50 {ms(percentile(one, 0.5))}")
    row(f"reuse checks, {len(full) + 1} uids (start-up)", f"p50 {ms(percentile(every, 0.5))}")


if __name__ == "__main__":
    main()

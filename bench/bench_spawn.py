"""Spawn paths inside the server's process, without gRPC: ``JobManager.start`` of ``true``
until it runs, through the zygote (the default) and through the launcher fallback
(``posix_spawn`` of ``python -I -S _launcher.py``), against ``asyncio``'s own
``create_subprocess_exec`` (no containment, no clean environment, no launcher).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from _common import header, ms, parser, percentile, row, workdir

from jobworker.backends.local.manager import JobManager
from jobworker.backends.local.spawn import Spawner
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.logconfig import configure_logging


async def manager_starts(spool: Path, count: int, zygote: bool) -> list[float]:
    spool.mkdir()
    manager = JobManager(Plugins(), spool, retain_finished=count + 100)
    manager._spawner = Spawner(use_zygote=zygote)  # the only switch between the two paths
    samples = []
    try:
        for i in range(count + 10):
            began = time.perf_counter()
            status = await manager.start(JobSpec("true"), owner="bench")
            if i >= 10:  # warm-up: the zygote starts on first use
                samples.append(time.perf_counter() - began)
            await manager.wait(status.job_id)
    finally:
        await manager.shutdown()
    return samples


async def asyncio_starts(count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        proc = await asyncio.create_subprocess_exec("true")
        samples.append(time.perf_counter() - began)
        await proc.wait()
    return samples


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--starts", type=int, default=300)
    options = p.parse_args()
    count = 100 if options.quick else options.starts
    configure_logging("warning")  # one line per job would be measured too
    header(f"spawn paths: {count} sequential JobManager.start('true'), no gRPC")
    with workdir() as work:
        zygote = asyncio.run(manager_starts(work / "zygote", count, zygote=True))
        launcher = asyncio.run(manager_starts(work / "launcher", count, zygote=False))
    plain = asyncio.run(asyncio_starts(count))
    for label, samples in (
        ("JobManager.start via the zygote", zygote),
        ("JobManager.start via the launcher", launcher),
        ("asyncio.create_subprocess_exec", plain),
    ):
        row(label, f"p50 {ms(percentile(samples, 0.5))}", f"p99 {ms(percentile(samples, 0.99))}")
    row(
        "launcher / zygote (p50)",
        f"{percentile(launcher, 0.5) / percentile(zygote, 0.5):.1f}x",
    )


if __name__ == "__main__":
    main()

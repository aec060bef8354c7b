"""Usage sampling and the metrics plugin over real cgroups (run in the VM, like the other
tests here): an OOM-killed job and a CPU-capped job, as /metrics and the samples show them."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobworker.backends.local.manager import JobManager
from jobworker.errors import FailedPrecondition
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec, Limits
from jobworker.model import TerminationReason
from jobworker.plugins.cgroupv2 import CgroupV2Plugin
from jobworker.plugins.metrics import Metrics
from tests.vm.test_jobs_in_cgroups import CGROUP_FS, _pure_v2

pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(not _pure_v2(), reason="needs a pure cgroup v2 host: run in the VM"),
]

BUSY = ("sh", ("-c", "while :; do :; done"))


Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(address: str) -> Scrape:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_oom_stop_and_refusal_counted_and_cpu_samples_reach_the_limit(tmp_path: Path) -> None:
    # The VM's init leaves the loopback down; /metrics is scraped over it.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    root = CGROUP_FS / f"jobworker-usage-{secrets.token_hex(4)}"

    async def main() -> None:
        cgroups = CgroupV2Plugin(root=root)
        cgroups.setup()
        metrics = Metrics()
        plugins = Plugins()
        plugins.register(cgroups, name="cgroupv2")
        plugins.register(metrics, name="metrics")
        metrics.jobworker_configure(
            argparse.Namespace(
                metrics_listen="127.0.0.1:0", metrics_tls=False, metrics_plain_http=False
            )
        )
        manager = JobManager(plugins, tmp_path)
        plugins.manager_ready(manager)
        try:
            await body(manager, metrics)
        finally:
            await manager.shutdown()
            plugins.shutdown()
            cgroups.shutdown()

    async def body(m: JobManager, metrics: Metrics) -> None:
        assert metrics.address is not None
        limit = 32 << 20
        hog = JobSpec(
            "sh",
            ("-c", "x=$(head -c 134217728 /dev/zero | tr '\\0' a); echo survived"),
            limits=Limits(memory=limit),
        )
        job = await m.start(hog, "alice")
        final = await m.wait(job.job_id)
        assert final.exit is not None and final.exit.reason is TerminationReason.OOM_KILLED
        with pytest.raises(FailedPrecondition):
            await m.start(JobSpec("/no/such/command"), "alice")

        # Half a core for a busy loop: the samples' CPU rate sits at the limit.
        busy = await m.start(JobSpec(*BUSY, limits=Limits(cpu=0.5)), "alice")
        await asyncio.sleep(6)
        usage = await m.usage(busy.job_id)
        during = await asyncio.to_thread(_scrape, metrics.address)
        await m.stop(busy.job_id, by="alice", grace=0)
        after = await asyncio.to_thread(_scrape, metrics.address)

        assert usage.source == "cgroupv2"
        samples = usage.samples[1:]  # the first may predate the command's first instruction
        assert len(samples) >= 4
        cores = (
            (samples[-1].cpu_usec - samples[0].cpu_usec)
            / 1e6
            / (samples[-1].time - samples[0].time)
        )
        assert 0.35 <= cores <= 0.6, f"{cores:.3f} cores, limit 0.5"
        assert all(s.memory_peak_bytes is not None and s.pids >= 1 for s in samples)

        def value(samples: Scrape, name: str, **labels: str) -> float:
            return samples.get((name, frozenset(labels.items())), 0.0)

        started = "jobworker_jobs_started_total"
        assert value(after, started, owner="alice", outcome="started") == 2
        assert value(after, started, owner="alice", outcome="FAILED_PRECONDITION") == 1
        assert value(after, "jobworker_job_exits_total", reason="oom_killed") == 1
        assert value(after, "jobworker_job_exits_total", reason="stopped") == 1
        assert value(during, "jobworker_jobs_running") == 1
        job_labels = {"job_id": busy.job_id, "owner": "alice"}
        assert value(during, "jobworker_job_cpu_seconds_total", **job_labels) > 1.0
        assert value(during, "jobworker_job_memory_peak_bytes", **job_labels) > 0

    asyncio.run(asyncio.wait_for(main(), 300))

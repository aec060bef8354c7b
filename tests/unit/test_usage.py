"""The usage ring, top's figures and the chart (no server; /proc: tests/integration)."""

from __future__ import annotations

import argparse
import asyncio
import time

import attrs
import pytest

from jobworker.backends.local.sampling import UsageSampler
from jobworker.cli.top import Row, cpu_series, frame, sparkline
from jobworker.errors import ConfigError
from jobworker.hooks import hookimpl
from jobworker.hooks.host import Plugins
from jobworker.jobspec import Limits
from jobworker.model import JobState, JobStatusView
from jobworker.usage import UsageRing, UsageSample


def sample(t: float, cpu: int = 0, memory: int = 1) -> UsageSample:
    return UsageSample(time=t, cpu_usec=cpu, memory_bytes=memory, pids=1)


def test_ring_keeps_every_sample_until_full() -> None:
    ring = UsageRing(capacity=8)
    for i in range(8):
        ring.add(sample(i + 0.5, cpu=i))
    assert [s.cpu_usec for s in ring.samples()] == list(range(8))
    assert [s.time for s in ring.samples()] == [i + 0.5 for i in range(8)]


def test_full_ring_thins_out_and_still_covers_the_whole_life() -> None:
    ring = UsageRing(capacity=8)
    for i in range(1000):
        ring.add(sample(float(i), cpu=i))
        assert len(ring) <= 8
    cpu = [s.cpu_usec for s in ring.samples()]
    assert cpu[0] == 0  # the start is never lost
    assert cpu[-2:] == [998, 999]  # the last second is always there, for rates
    assert cpu == sorted(cpu) and len(cpu) == len(set(cpu))
    assert len(cpu) <= 8 + 2
    assert [s.cpu_usec for s in ring.samples(last=2)] == [998, 999]


def test_optional_fields_survive_the_ring() -> None:
    ring = UsageRing(capacity=2)
    full = UsageSample(1.5, 10, 20, 3, memory_peak_bytes=30, io_read_bytes=0, io_write_bytes=7)
    ring.add(full)
    ring.add(sample(2.5))
    ring.add(sample(3.5))
    assert ring.samples()[0] == full
    assert ring.samples()[-1].io_read_bytes is None


def view(job_id: str, started_at: float, owner: str = "alice") -> JobStatusView:
    return JobStatusView(
        job_id=job_id, state=JobState.RUNNING, reason=None, exit_code=None, signal=None,
        owner=owner, stopped_by=None, escalated=False, started_at=started_at, ended_at=None,
        command="sleep", args=("60",), limits=Limits(), usage=None, containment="x",
        output_bytes=0, output_kept_bytes=0, output_truncated=False, pid=1, user=None,
        uid=None, isolation="none",
    )  # fmt: skip


def test_top_rates_come_from_the_last_two_samples() -> None:
    samples = [
        UsageSample(10.0, 1_000_000, 100, 2, io_read_bytes=0, io_write_bytes=0),
        UsageSample(12.0, 2_000_000, 300, 3, io_read_bytes=4096, io_write_bytes=None),
    ]
    row = Row.of(view("a", 0.0), samples)
    assert row.cpu_percent == pytest.approx(50.0)
    assert (row.memory, row.pids, row.io_read_rate, row.io_write_rate) == (300, 3, 2048, None)
    only = Row.of(view("b", 8.0), samples[1:])  # one sample: the average since the start
    assert only.cpu_percent == pytest.approx(50.0)
    assert Row.of(view("c", 0.0), []).cpu_percent is None


def test_top_frame_sorts() -> None:
    busy = Row(view("busy", 0.0), cpu_percent=90.0, memory=1)
    big = Row(view("big", 5.0, owner="bob"), cpu_percent=1.0, memory=2**30)
    ids = lambda text: [line.split()[0] for line in text.splitlines()[2:]]  # noqa: E731
    assert ids(frame([big, busy], "cpu", 10.0)) == ["busy", "big"]
    assert ids(frame([busy, big], "mem", 10.0)) == ["big", "busy"]
    assert ids(frame([big, busy], "runtime", 10.0)) == ["busy", "big"]
    assert ids(frame([busy, big], "cpu", 10.0, reverse=True)) == ["big", "busy"]
    assert frame([busy], "cpu", 10.0, reverse=True).startswith(
        "1 running jobs, sorted by cpu, reversed\n"
    )
    text = frame([big], "id", 3671.0)
    assert "1.0GiB" in text and "01:01:06" in text and text.endswith("sleep 60")


def test_top_frame_has_a_node_column_only_for_cluster_jobs() -> None:
    local = Row(view("local", 0.0), cpu_percent=1.0)
    assert "NODE" not in frame([local], "cpu", 10.0)
    remote = Row(attrs.evolve(view("remote", 0.0), node="w1"), cpu_percent=2.0)
    lines = frame([local, remote], "cpu", 10.0).splitlines()
    assert lines[1].split()[:3] == ["JOB", "OWNER", "NODE"]
    assert [line.split()[:3] for line in lines[2:]] == [
        ["remote", "alice", "w1"],
        ["local", "alice", "-"],
    ]


def test_top_frame_escapes_what_a_job_or_its_owner_chose() -> None:
    hostile = attrs.evolve(view("x", 0.0, owner="\x1b]0;o"), args=("\x1b[2J",))
    text = frame([Row(hostile)], "id", 1.0)
    assert "\x1b" not in text and text.endswith("sleep '\\x1b[2J'")
    assert "\\x1b]0;o" in text


def test_sparkline_scales_to_the_peak_and_width() -> None:
    assert sparkline([0, 1, 2, 4]) == "▁▃▅█"
    assert sparkline([0, 0]) == "▁▁"
    assert len(sparkline(list(range(1000)), width=60)) == 60
    assert cpu_series([sample(0, 0), sample(2, 1_000_000), sample(3, 2_000_000)]) == [0.5, 1.0]


# -- the metrics plugin's set-up (no server) ----------------------------------------------------


def metrics_options(listen: str, **flags: bool) -> argparse.Namespace:
    return argparse.Namespace(
        metrics_listen=listen,
        metrics_tls=flags.get("tls", False),
        metrics_plain_http=flags.get("plain", False),
    )


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.1:9464"])
def test_metrics_refuse_a_public_address_without_tls_or_the_flag(listen: str) -> None:
    from jobworker.plugins.metrics import Metrics

    with pytest.raises(ConfigError, match="is not a loopback address"):
        Metrics().jobworker_configure(metrics_options(listen))


def test_metrics_registry_reaches_every_plugin() -> None:
    from jobworker.plugins.metrics import Metrics

    seen = []

    class Quota:
        @hookimpl
        def jobworker_metrics_ready(self, registry: object) -> None:
            seen.append(registry)

    plugins = Plugins()
    metrics = Metrics()
    plugins.register(metrics, name="metrics")
    plugins.register(Quota(), name="quota")
    plugins.metrics_ready()
    assert seen == [metrics.registry]
    alone = Plugins()
    alone.register(Quota(), name="quota")
    alone.metrics_ready()  # no metrics plugin: not called
    assert seen == [metrics.registry]


class _Costly:
    """A containment whose every sample burns 30 ms of CPU."""

    def sample_usage(self) -> UsageSample:
        end = time.thread_time() + 0.03
        while time.thread_time() < end:
            pass
        return sample(time.time())


def test_sampler_stretches_its_period_to_stay_within_its_cpu_budget() -> None:
    async def main() -> int:
        sampler = UsageSampler(interval=0.01)
        sampler.track("job", 1, _Costly())
        await asyncio.sleep(1.5)
        await sampler.close()
        found = sampler.get("job")
        assert found is not None and found.source == "cgroupv2"
        return len(found.samples)

    # 30 ms at 5% of a core: one round per 0.6 s, not one per 10 ms.
    assert 1 <= asyncio.run(main()) <= 3

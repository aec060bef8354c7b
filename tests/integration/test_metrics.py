"""The metrics plugin through a real server: scrape ``/metrics`` after a known sequence of
jobs and parse it with prometheus-client's own parser."""

from __future__ import annotations

import argparse
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from jobworker.api.pki import PkiPaths, write_crl
from jobworker.backends.local.manager import JobManager
from jobworker.hooks import hookimpl
from jobworker.plugins.metrics import SCRAPE_TIMEOUT, Metrics
from jobworker.v1 import jobworker_pb2 as pb
from tests.serverfixtures import (
    RPC_TIMEOUT_S,
    RunningServer,
    authz_plugins,
    running_server,
    start_job,
    wait_exited,
)


class Quota:
    """A third-party plugin with a counter of its own."""

    @hookimpl
    def jobworker_metrics_ready(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.checked = Counter("quota_checked", "Starts a quota looked at", registry=registry)

    @hookimpl
    def jobworker_start_refused(self) -> None:
        self.checked.inc()


def options(pki: PkiPaths, **flags: Any) -> argparse.Namespace:
    files = pki.server()
    return argparse.Namespace(
        metrics_listen=flags.get("listen", "127.0.0.1:0"),
        metrics_tls=flags.get("tls", False),
        metrics_plain_http=False,
        tls_cert=files.cert,
        tls_key=files.key,
        tls_ca=files.ca,
        authz=pki.authz,
    )


@pytest.fixture
def metered(api_pki: PkiPaths) -> Iterator[tuple[RunningServer, Metrics]]:
    plugins = authz_plugins(api_pki.authz)
    metrics = Metrics()
    plugins.register(metrics, name="metrics")
    plugins.register(Quota(), name="quota")
    metrics.jobworker_configure(options(api_pki))
    plugins.metrics_ready()
    with running_server(api_pki, plugins=plugins) as server:
        yield server, metrics
    plugins.shutdown()


def scrape(
    url: str, context: ssl.SSLContext | None = None
) -> dict[tuple[str, frozenset[Any]], float]:
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT_S, context=context) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_scrape_after_a_known_sequence_of_jobs(
    metered: tuple[RunningServer, Metrics],
) -> None:
    server, metrics = metered
    alice = server.stub("alice")
    echo = start_job(alice, "echo", "hello")
    assert wait_exited(alice, echo).reason == "exited"
    with pytest.raises(grpc.RpcError) as denied:
        start_job(server.stub("mallory"), "true")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as refused:
        start_job(alice, "/no/such/command")
    refused_code = refused.value.code().name
    sleeper = start_job(alice, "sleep", "60")
    time.sleep(2.5)  # sampled at least once
    url = f"http://{metrics.address}/metrics"
    during = scrape(url)
    alice.StopJob(pb.JobRequest(job_id=sleeper, grace_seconds=5), timeout=RPC_TIMEOUT_S)
    after = scrape(url)

    def started(samples: Any, owner: str, outcome: str) -> float:
        return value(samples, "jobworker_jobs_started_total", owner=owner, outcome=outcome)

    assert started(after, "alice", "started") == 2
    assert started(after, "mallory", "PERMISSION_DENIED") == 1
    assert started(after, "alice", refused_code) == 1
    assert value(after, "quota_checked_total") == 1  # the third-party counter, same page
    assert value(during, "jobworker_jobs_running") == 1
    assert value(after, "jobworker_jobs_running") == 0
    assert value(after, "jobworker_job_exits_total", reason="exited") == 1
    assert value(after, "jobworker_job_exits_total", reason="stopped") == 1
    # RPCs by method and code: the histogram's count.
    rpc = "jobworker_rpc_duration_seconds_count"
    assert value(after, rpc, method="StartJob", code="OK") == 2
    assert value(after, rpc, method="StartJob", code="PERMISSION_DENIED") == 1
    assert value(after, rpc, method="StartJob", code=refused_code) == 1
    assert value(after, rpc, method="StreamOutput", code="OK") == 1
    assert value(after, rpc, method="StopJob", code="OK") == 1
    assert value(after, "jobworker_rpc_duration_seconds_bucket", method="StopJob", code="OK",
                 le="+Inf") == 1  # fmt: skip
    assert value(after, "jobworker_followers_open") == 0
    assert value(after, "jobworker_output_spooled_bytes_total") == len(b"hello\n")
    assert value(after, "jobworker_output_streamed_bytes_total") == len(b"hello\n")
    assert value(after, "jobworker_spool_bytes") > 0
    assert value(after, "jobworker_spool_free_bytes") > 0
    assert value(after, "process_resident_memory_bytes") > 10 * 2**20
    assert value(after, "process_open_fds") > 3
    # Per-job series: the running sleeper, and the finished jobs still retained.
    job = {"job_id": sleeper, "owner": "alice"}
    assert value(during, "jobworker_job_pids", **job) >= 1
    assert value(during, "jobworker_job_memory_bytes", **job) > 0
    assert ("jobworker_job_cpu_seconds_total", frozenset(job.items())) in during


def test_per_job_series_stay_while_the_job_is_retained(
    metered: tuple[RunningServer, Metrics],
) -> None:
    server, metrics = metered
    alice = server.stub("alice")
    job = start_job(alice, "sleep", "60")
    time.sleep(1.5)
    url = f"http://{metrics.address}/metrics"
    assert value(scrape(url), "jobworker_job_pids", job_id=job, owner="alice") >= 1
    alice.StopJob(pb.JobRequest(job_id=job, grace_seconds=0), timeout=RPC_TIMEOUT_S)
    # Finished but retained: its last values stay.
    assert ("jobworker_job_pids", frozenset({"job_id": job, "owner": "alice"}.items())) in scrape(
        url
    )
    manager = metrics.manager
    assert isinstance(manager, JobManager)
    manager._table.retain_finished = 0  # the next listing evicts every finished job
    alice.ListJobs(pb.ListJobsRequest(), timeout=RPC_TIMEOUT_S)
    assert not [key for key in scrape(url) if ("job_id", job) in key[1]]


def test_metrics_over_tls_need_a_whitelisted_client_certificate(api_pki: PkiPaths) -> None:
    metrics = Metrics()
    metrics.jobworker_configure(options(api_pki, listen="127.0.0.1:0", tls=True))
    try:
        url = f"https://{metrics.address}/metrics"
        context = ssl.create_default_context(cafile=api_pki.server().ca)
        context.check_hostname = False  # the server certificate names localhost, not the IP
        with pytest.raises(OSError):  # handshake refused: no client certificate
            scrape(url, context)
        mallory = api_pki.client("mallory")  # signed by the CA, not on the whitelist
        context.load_cert_chain(mallory.cert, mallory.key)
        with pytest.raises(OSError):
            scrape(url, context)
        alice = api_pki.client("alice")
        context.load_cert_chain(alice.cert, alice.key)
        assert value(scrape(url, context), "jobworker_jobs_running") == 0
    finally:
        metrics.jobworker_shutdown()


def test_metrics_over_tls_refuse_a_revoked_client(api_pki: PkiPaths, tmp_path: Path) -> None:
    """The gRPC port's CRL holds for the metrics port too."""
    bob = api_pki.client("bob")
    serial = x509.load_pem_x509_certificate(bob.cert.read_bytes()).serial_number
    crl = write_crl(api_pki.load_ca(), [serial], tmp_path / "ca.crl")
    metrics = Metrics()
    flags = options(api_pki, listen="127.0.0.1:0", tls=True)
    flags.tls_crl = crl
    metrics.jobworker_configure(flags)
    try:
        url = f"https://{metrics.address}/metrics"
        context = ssl.create_default_context(cafile=api_pki.server().ca)
        context.check_hostname = False
        context.load_cert_chain(bob.cert, bob.key)  # whitelisted, but revoked
        with pytest.raises(OSError):
            scrape(url, context)
        alice = api_pki.client("alice")
        context.load_cert_chain(alice.cert, alice.key)
        assert value(scrape(url, context), "jobworker_jobs_running") == 0
    finally:
        metrics.jobworker_shutdown()


def test_a_client_that_never_shakes_hands_holds_up_no_other_scrape(api_pki: PkiPaths) -> None:
    metrics = Metrics()
    metrics.jobworker_configure(options(api_pki, listen="127.0.0.1:0", tls=True))
    try:
        assert metrics.address is not None
        host, port = metrics.address.rsplit(":", 1)
        context = ssl.create_default_context(cafile=api_pki.server().ca)
        context.check_hostname = False
        alice = api_pki.client("alice")
        context.load_cert_chain(alice.cert, alice.key)
        with socket.create_connection((host, int(port)), timeout=RPC_TIMEOUT_S):
            began = time.monotonic()  # connected, silent: its handshake waits in its thread
            assert (
                value(
                    scrape(f"https://{metrics.address}/metrics", context), "jobworker_jobs_running"
                )
                == 0
            )
            assert time.monotonic() - began < SCRAPE_TIMEOUT / 2
    finally:
        metrics.jobworker_shutdown()

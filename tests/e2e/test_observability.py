"""``jobworker top``, ``status --usage`` and the metrics endpoint's address rule, as a user
runs them: the installed command against a ``jobworker serve`` subprocess."""

from __future__ import annotations

import json
import time

from tests.e2e.conftest import Cli, Pki, StartServer, clean_env, jobworker

BUSY = ("sh", "-c", "while :; do :; done")


def test_top_once_shows_a_row_per_running_job(cli: Cli) -> None:
    jobs = [cli.ok("start", "--", "sleep", "60").strip() for _ in range(3)]
    try:
        time.sleep(1.5)  # at least one sample each
        frame = cli.ok("top", "--once", "--sort", "id")
        lines = frame.splitlines()
        assert lines[1].split()[:3] == ["JOB", "OWNER", "CPU%"]
        rows = {line.split()[0]: line.split() for line in lines[2:]}
        for job_id in jobs:
            assert job_id in rows, frame
            assert rows[job_id][1] == "alice"
            assert rows[job_id][-2:] == ["sleep", "60"]
        # root (admin) sees alice's jobs too; a finished job is not a row.
        assert set(jobs) <= set(cli.ok("top", "--once", as_="root").split())
    finally:
        for job_id in jobs:
            cli.ok("stop", "--grace", "0", "--", job_id)
    assert not set(jobs) & set(cli.ok("top", "--once").split())


def test_status_usage_json_gives_rising_cpu_samples_and_a_chart(cli: Cli) -> None:
    job_id = cli.ok("start", "--", *BUSY).strip()
    try:
        time.sleep(3.5)
        data = json.loads(cli.ok("status", "--usage", "--json", "--", job_id))
        chart = cli.ok("status", "--usage", "--", job_id)
    finally:
        cli.ok("stop", "--grace", "0", "--", job_id)
    assert data["job_id"] == job_id and data["source"] == "proc"
    samples = data["samples"]
    assert len(samples) >= 3
    assert list(samples[0]) == [
        "time", "cpu_usec", "memory_bytes", "pids", "memory_peak_bytes", "io_read_bytes",
        "io_write_bytes",
    ]  # fmt: skip
    cpu = [s["cpu_usec"] for s in samples]
    assert cpu == sorted(cpu) and cpu[-1] > cpu[0], cpu  # a busy loop burns CPU
    assert all(s["pids"] >= 1 and s["memory_bytes"] > 0 for s in samples)
    lines = chart.splitlines()
    assert lines[0].startswith(f"job {job_id}: ") and "from proc" in lines[0]
    assert lines[1].startswith("cpu ") and "peak" in lines[1]
    assert lines[2].startswith("memory ")
    # Another user's job is as unknown as a job that does not exist.
    result = jobworker("status", "--usage", "--", job_id, env=cli.env("mallory"))
    assert result.returncode == 1 and b"PERMISSION_DENIED" in result.stderr


def test_metrics_on_a_public_address_need_tls_or_a_flag(
    start_server: StartServer, pki: Pki
) -> None:
    args = ["serve", *pki.server_args(), "--plugin", "metrics", "--metrics-listen", "0.0.0.0:0"]
    result = jobworker(*args, env=clean_env())
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "jobworker: error: --metrics-listen 0.0.0.0:0 is not a loopback address: add "
        "--metrics-tls (client certificates from the server's CA) or, to serve plain HTTP "
        "on purpose, --metrics-plain-http\n"
    )
    server = start_server(*pki.server_args(), "--plugin", "metrics", "--metrics-listen",
                          "0.0.0.0:0", "--metrics-plain-http")  # fmt: skip
    listening = [e for e in server.events() if e["event"] == "metrics_listening"]
    assert listening and str(listening[0]["address"]).startswith("0.0.0.0:")

"""The Ray backend through the real gRPC API: placement, pins, refusals, output, stop,
lost nodes, a restarted front server, audit and authorization (tests/ray_cluster/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from jobworker.api.pki import PkiPaths
from jobworker.backends.ray.tree import descendants
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.ray_cluster.conftest import JOBWORKER, PLACEMENT_TIMEOUT_S, Front, StartFront
from tests.serverfixtures import RPC_TIMEOUT_S, output_of, running_server, start_job, wait_exited

ONE_CPU = pb.Limits(cpu=1)
BUSY = ("sh", "-c", "while :; do :; done")


def status(stub: pb_grpc.JobServiceStub, job_id: str) -> pb.JobStatusResponse:
    reply: pb.JobStatusResponse = stub.GetStatus(pb.JobRequest(job_id=job_id), timeout=10)
    return reply


def usage(stub: pb_grpc.JobServiceStub, job_id: str) -> pb.JobUsage:
    reply: pb.JobUsage = stub.GetUsage(pb.UsageRequest(job_id=job_id), timeout=10)
    return reply


def stop(stub: pb_grpc.JobServiceStub, job_id: str) -> pb.JobResponse:
    reply: pb.JobResponse = stub.StopJob(
        pb.JobRequest(job_id=job_id, grace_seconds=1), timeout=RPC_TIMEOUT_S
    )
    return reply


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate: object, timeout: float, what: str) -> float:
    """Poll ``predicate`` (a callable) until true; return the seconds it took."""
    assert callable(predicate)
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def agent_pid(job_pid: int) -> int:
    """The node agent above a job's first process (host pids): the Ray actor process."""
    pid = job_pid
    while pid > 1:
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::NodeAgent"):
            return pid
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    pytest.fail(f"no node agent above pid {job_pid}")


@pytest.fixture
def alice(front: Front) -> Iterator[pb_grpc.JobServiceStub]:
    stub = front.stub("alice")
    yield stub
    # Leave no running job of this test behind: they would hold the nodes' CPUs.
    for job in stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs:
        if job.status == "running":
            stop(stub, job.job_id)


def test_two_one_cpu_jobs_spread_over_the_two_one_cpu_nodes(
    alice: pb_grpc.JobServiceStub,
) -> None:
    first = start_job(alice, "sleep", "30", limits=ONE_CPU)
    second = start_job(alice, "sleep", "30", limits=ONE_CPU)
    nodes = {status(alice, first).node, status(alice, second).node}
    # The head takes no CPU job and w3 is kept for the node-loss test, so the two 1-CPU
    # jobs can only be on w1 and w2, one each -- unless placement also used w3.
    assert len(nodes) == 2
    assert nodes <= {"w1", "w2", "w3"}
    listed = alice.ListJobs(pb.ListJobsRequest(), timeout=10).jobs
    assert {j.node for j in listed if j.job_id in (first, second)} == nodes


def test_unpinned_jobs_never_land_on_the_zero_cpu_head(alice: pb_grpc.JobServiceStub) -> None:
    # More jobs than worker nodes, with no ask (least-loaded choice) and with a memory-only
    # ask (a placement group Ray could put on the head's memory).
    jobs = [start_job(alice, "sleep", "30") for _ in range(5)]
    jobs += [
        start_job(alice, "sleep", "30", limits=pb.Limits(memory_bytes=64 << 20)) for _ in range(2)
    ]
    assert "head" not in {status(alice, j).node for j in jobs}
    pinned = start_job(alice, "sh", "-c", "echo on the head", node="head")
    assert wait_exited(alice, pinned).node == "head"
    assert output_of(alice, pinned) == [("stdout", b"on the head\n")]


def test_node_pins_a_job(alice: pb_grpc.JobServiceStub) -> None:
    job_id = start_job(alice, "sh", "-c", "echo pinned", node="w2")
    final = wait_exited(alice, job_id)
    assert (final.node, final.reason, final.exit_code) == ("w2", "exited", 0)
    on_w2 = alice.ListJobs(pb.ListJobsRequest(node="w2"), timeout=10).jobs
    assert job_id in {j.job_id for j in on_w2}
    assert all(j.node == "w2" for j in on_w2)
    with pytest.raises(grpc.RpcError) as refused:
        start_job(alice, "true", node="nowhere")
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "no node named 'nowhere'" in refused.value.details()
    assert "w1" in refused.value.details()


def test_infeasible_job_is_refused_at_once_naming_the_ask_and_the_largest_node(
    alice: pb_grpc.JobServiceStub,
) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        start_job(alice, "true", limits=pb.Limits(cpu=8))
    assert time.monotonic() - started < 5
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    message = refused.value.details()
    assert "8 CPU asked for" in message
    assert "the largest node is" in message and "1 CPU" in message


def test_job_that_does_not_fit_now_is_refused_after_the_placement_timeout(
    alice: pb_grpc.JobServiceStub,
) -> None:
    holder = start_job(alice, "sleep", "30", limits=ONE_CPU, node="w1")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        start_job(alice, "true", limits=ONE_CPU, node="w1")
    took = time.monotonic() - started
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert PLACEMENT_TIMEOUT_S - 0.5 < took < PLACEMENT_TIMEOUT_S + 5
    assert "free now" in refused.value.details()
    stop(alice, holder)
    # The stopped job gave its CPU back: the same ask fits again.
    wait_exited(alice, start_job(alice, "true", limits=ONE_CPU, node="w1"))


def test_output_of_seq_gzip_is_byte_exact_with_streams_apart_and_resumable(
    alice: pb_grpc.JobServiceStub,
) -> None:
    script = "seq 200000 | gzip; echo done >&2"
    job_id = start_job(alice, "sh", "-c", script)
    chunks = list(alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=60))
    expected = subprocess.run(["sh", "-c", "seq 200000 | gzip"], capture_output=True).stdout
    assert b"".join(c.data for c in chunks if c.stream == "stdout") == expected
    assert b"".join(c.data for c in chunks if c.stream == "stderr") == b"done\n"
    # Resume from every chunk's offset: the rest, nothing lost or repeated.
    middle = len(chunks) // 2
    rest = output_of(alice, job_id, offset=chunks[middle].offset)
    assert rest == [(c.stream, c.data) for c in chunks[middle + 1 :]]
    assert status(alice, job_id).output_bytes == len(expected) + len(b"done\n")


def test_stop_kills_the_whole_tree_on_its_node(alice: pb_grpc.JobServiceStub) -> None:
    job_id = start_job(alice, "sh", "-c", "setsid sleep 300 & echo started; sleep 300", node="w2")
    stream = alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=60)
    assert next(stream).data == b"started\n"
    # Host pids, read from /proc (the job may run in its own pid namespace, where $! is
    # another number): the job's first process and everything below it, setsid or not.
    first = status(alice, job_id).pid
    tree = [first, *descendants(first)]
    try:
        assert len(tree) >= 3, tree  # sh, the setsid sleep, the other sleep
        reply = stop(alice, job_id)
        assert reply.status.reason == "stopped"
        wait_for(lambda: not any(alive(p) for p in tree), 10, "the job's processes gone")
    finally:
        for pid in tree:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_audit_log_records_cluster_jobs(
    front: Front, alice: pb_grpc.JobServiceStub, started_fronts: list[Front]
) -> None:
    job_id = start_job(alice, "true", node="w1")
    wait_exited(alice, job_id)
    with pytest.raises(grpc.RpcError):
        start_job(alice, "true", limits=pb.Limits(cpu=64))

    def records(fronts: list[Front]) -> dict[str, list[dict[str, object]]]:
        found: dict[str, list[dict[str, object]]] = {}
        for record in (r for f in fronts for r in f.audit()):
            found.setdefault(str(record["audit"]), []).append(record)
        return found

    # The end is recorded once, by whichever front server reported it first (other
    # tests' fronts may be running: docs/cluster.md, "Many front servers").
    def exits() -> list[dict[str, object]]:
        return [r for r in records(started_fronts).get("job_exited", []) if r["job_id"] == job_id]

    wait_for(exits, 10, "the job_exited record")
    seen = records([front])
    assert (
        next(r["node"] for r in seen["job_started"] if r["job_id"] == job_id),
        [r["node"] for r in exits()],
    ) == ("w1", ["w1"])
    assert any(r["owner"] == "alice" for r in seen["job_refused"])
    assert any(r["job_id"] == job_id and r["action"] == "status" for r in seen["decision"])


def _outcomes(stub_of: object, pki: PkiPaths, job_of_alice: str) -> dict[str, str]:
    """Status code per (identity, call) against one server."""
    assert callable(stub_of)
    found = {}
    for name in ("alice", "bob", "root", "mallory"):
        stub = stub_of(name)
        calls = {
            "status": lambda s=stub: s.GetStatus(pb.JobRequest(job_id=job_of_alice), timeout=10),
            "stream": lambda s=stub: list(
                s.StreamOutput(pb.JobRequest(job_id=job_of_alice), timeout=10)
            ),
            "stop-unknown": lambda s=stub: s.StopJob(pb.JobRequest(job_id="nope"), timeout=10),
            "list": lambda s=stub: s.ListJobs(pb.ListJobsRequest(), timeout=10),
            "start-bad": lambda s=stub: s.StartJob(pb.StartJobRequest(command=""), timeout=10),
        }
        for call, run in calls.items():
            try:
                run()
                found[f"{name} {call}"] = "OK"
            except grpc.RpcError as err:
                found[f"{name} {call}"] = err.code().name
    return found


def test_authorization_is_the_same_as_on_a_single_server(
    front: Front, alice: pb_grpc.JobServiceStub, ray_pki: PkiPaths
) -> None:
    cluster_job = start_job(alice, "true")
    wait_exited(alice, cluster_job)
    cluster = _outcomes(front.stub, ray_pki, cluster_job)
    with running_server(ray_pki) as local:
        local_job = start_job(local.stub("alice"), "true")
        wait_exited(local.stub("alice"), local_job)
        single = _outcomes(local.stub, ray_pki, local_job)
    assert cluster == single
    assert cluster["bob status"] != "OK" and cluster["root status"] == "OK"


def test_restarted_front_server_knows_the_running_jobs(start_front: StartFront) -> None:
    first = start_front()
    stub = first.stub("alice")
    job_id = start_job(stub, "sh", "-c", "echo before; sleep 300", node="w1")
    assert next(iter(stub.StreamOutput(pb.JobRequest(job_id=job_id), timeout=10))).data
    first.kill()

    second = start_front()
    stub = second.stub("alice")
    again = status(stub, job_id)
    assert (again.status, again.owner, again.node) == ("running", "alice", "w1")
    listed = {j.job_id for j in stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs}
    assert job_id in listed
    head = next(iter(stub.StreamOutput(pb.JobRequest(job_id=job_id, offset=0), timeout=10)))
    assert head.data == b"before\n"
    assert stop(stub, job_id).status.reason == "stopped"
    # SIGTERM of a front server stops none of the cluster's jobs: they outlive any front.
    running = start_job(stub, "sleep", "300", node="w1")
    second.terminate()
    # A clean stop, and it reads as one: no crash report of Ray's on SIGTERM.
    assert '"server_stopped"' in second.log() and '"ray_jobs_left_running"' in second.log()
    assert "SIGTERM received" not in second.log() and "Traceback" not in second.log()
    third = start_front()
    assert status(third.stub("alice"), running).status == "running"
    assert stop(third.stub("alice"), running).status.reason == "stopped"


def test_usage_of_a_busy_job_is_sampled_on_its_node(
    front: Front, alice: pb_grpc.JobServiceStub
) -> None:
    job_id = start_job(alice, *BUSY, node="w2")

    def rising() -> bool:
        samples = usage(alice, job_id).samples
        return len(samples) >= 2 and samples[-1].cpu_usec > samples[0].cpu_usec

    wait_for(rising, 20, "two samples with rising CPU")
    found = usage(alice, job_id)
    assert found.source in ("proc", "cgroupv2")
    cpu = [s.cpu_usec for s in found.samples]
    assert cpu == sorted(cpu)
    assert found.samples[-1].memory_bytes > 0 and found.samples[-1].pids >= 1
    assert len(alice.GetUsage(pb.UsageRequest(job_id=job_id, last=1), timeout=10).samples) == 1
    listed = {u.job_id: u for u in alice.ListUsage(pb.ListUsageRequest(last=2), timeout=10).jobs}
    assert len(listed[job_id].samples) == 2
    # Another user sees neither the job's usage nor the job in the list, as on one server.
    bob = front.stub("bob")
    with pytest.raises(grpc.RpcError) as hidden:
        usage(bob, job_id)
    assert hidden.value.code() is grpc.StatusCode.NOT_FOUND
    assert job_id not in {u.job_id for u in bob.ListUsage(pb.ListUsageRequest(), timeout=10).jobs}
    stop(alice, job_id)
    # The agent keeps a finished job's samples with the job.
    assert len(usage(alice, job_id).samples) >= len(cpu)
    assert job_id not in {u.job_id for u in alice.ListUsage(pb.ListUsageRequest(), timeout=10).jobs}


def cli_of(front: Front, ray_pki: PkiPaths) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """The ``jobworker`` command as alice, against ``front``."""
    return cli_at(front.address, ray_pki)


def cli_env(server: str, ray_pki: PkiPaths) -> dict[str, str]:
    """The environment of the ``jobworker`` command as alice, dialling ``server``."""
    files = ray_pki.client("alice")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWORKER_")}
    env.update(
        JOBWORKER_HOME=str(ray_pki.directory / "no-dev-pki"),
        JOBWORKER_SERVER=server,
        JOBWORKER_TLS_CERT=str(files.cert),
        JOBWORKER_TLS_KEY=str(files.key),
        JOBWORKER_TLS_CA=str(files.ca),
    )
    return env


def cli_at(server: str, ray_pki: PkiPaths) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """The ``jobworker`` command as alice, dialling ``server`` (``--server``'s syntax)."""
    env = cli_env(server, ray_pki)

    def cli(*args: str, stdin_bytes: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [JOBWORKER, *args], env=env, input=stdin_bytes, capture_output=True, timeout=60
        )

    return cli


def test_the_cli_runs_pins_and_lists_by_node(front: Front, ray_pki: PkiPaths) -> None:
    cli = cli_of(front, ray_pki)
    ran = cli("run", "--node", "w2", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (ran.returncode, ran.stdout, ran.stderr) == (3, b"out\n", b"err\n")
    listed = json.loads(cli("list", "--node", "w2", "--json").stdout)
    assert listed and {job["node"] for job in listed} == {"w2"}
    refused = cli("start", "--node", "nowhere", "--", "true")
    assert refused.returncode != 0
    assert b"no node named 'nowhere'" in refused.stderr


def test_the_cli_shows_a_cluster_jobs_usage_and_top_its_node(
    front: Front, alice: pb_grpc.JobServiceStub, ray_pki: PkiPaths
) -> None:
    cli = cli_of(front, ray_pki)
    job_id = start_job(alice, *BUSY, node="w1")

    def samples() -> list[dict[str, float]]:
        shown = cli("status", job_id, "--usage", "--json")
        assert shown.returncode == 0, shown.stderr
        found: list[dict[str, float]] = json.loads(shown.stdout)["samples"]
        return found

    wait_for(lambda: len(samples()) >= 2, 20, "two samples through the CLI")
    cpu = [s["cpu_usec"] for s in samples()]
    assert cpu == sorted(cpu) and cpu[-1] > cpu[0]
    chart = cli("status", job_id, "--usage")
    assert chart.returncode == 0 and f"job {job_id}:".encode() in chart.stdout
    top = cli("top", "--once", "--sort", "id")
    assert top.returncode == 0, top.stderr
    lines = top.stdout.decode().splitlines()
    assert lines[1].split()[:3] == ["JOB", "OWNER", "NODE"]
    row = next(line.split() for line in lines[2:] if line.startswith(job_id))
    assert row[1:3] == ["alice", "w1"]
    assert float(row[3]) > 10  # CPU%: a busy loop, on a 2-core machine with others
    stop(alice, job_id)


def test_a_front_with_the_metrics_plugin_shows_per_job_series_from_the_nodes(
    start_front: StartFront,
) -> None:
    """The per-job series (CPU, memory, pids) of a job on a node, pulled from its agent at
    each scrape, on the front's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.ray_cluster.conftest import _free_port

    port = _free_port()
    front = start_front("--plugin", "metrics", f"--metrics-listen=127.0.0.1:{port}")
    alice = front.stub("alice")
    job_id = start_job(alice, *BUSY, node="w1")
    labels = {"job_id": job_id, "owner": "alice"}

    def series() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text = page.read().decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.labels == labels
        }

    wait_for(lambda: series().get("jobworker_job_cpu_seconds_total", 0) > 0.2, 30, "CPU")
    found = series()
    assert found["jobworker_job_memory_bytes"] > 0
    assert found["jobworker_job_pids"] >= 1
    stop(alice, job_id)

"""The gRPC API end to end: real mTLS on 127.0.0.1, real processes."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobworker import hookimpl
from jobworker.api.pki import PkiPaths, write_crl
from jobworker.api.server import serve
from jobworker.api.tlsfiles import TlsFiles
from jobworker.client import JobClient, JobEnd
from jobworker.config import ServerConfig
from jobworker.errors import ConfigError, NotFound
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.model import Action
from jobworker.plugins.authz import Authz
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1.jobworker_pb2_grpc import JobServiceStub
from tests.serverfixtures import (
    RPC_TIMEOUT_S,
    RunningServer,
    authz_plugins,
    output_of,
    running_server,
    start_job,
    wait_exited,
)

T = RPC_TIMEOUT_S


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- the happy path ------------------------------------------------------------------------


def test_start_stream_status(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    job_id = start_job(
        alice,
        "sh",
        "-c",
        'echo "$GREETING from $(pwd)"; echo oops >&2',
        env={"GREETING": "hi"},
        cwd="/",
    )
    assert output_of(alice, job_id) == [("stdout", b"hi from /\n"), ("stderr", b"oops\n")]
    status = alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T)
    assert (status.status, status.reason, status.exit_code) == ("exited", "exited", 0)
    assert status.owner == "alice"
    assert (status.command, list(status.args)) == ("sh", ["-c", status.args[1]])
    assert status.ended_at >= status.started_at > 0
    assert status.output_bytes > 0


def test_stop_running_job(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    job_id = start_job(alice, "sleep", "60")
    reply = alice.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=5), timeout=T)
    assert reply.success and not reply.already_finished and not reply.escalated
    assert reply.message == "stopped by alice (signal 15)"
    assert (reply.status.status, reply.status.reason, reply.status.stopped_by) == (
        "exited",
        "stopped",
        "alice",
    )
    again = alice.StopJob(pb.JobRequest(job_id=job_id), timeout=T)
    assert again.success and again.already_finished
    assert again.message == "job already finished (stopped by alice (signal 15))"


def test_stop_escalates_after_grace(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    job_id = start_job(alice, "sh", "-c", 'trap "" TERM; echo ready; while :; do sleep 1; done')
    next(iter(alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=T)))  # trap is set
    reply = alice.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=0.2), timeout=T)
    assert reply.success and reply.escalated
    assert reply.status.signal == 9 and reply.status.exit_code == 128 + 9


def test_offsets_resume_and_no_follow(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    job_id = start_job(
        alice, "sh", "-c", "echo one; sleep 0.1; echo two >&2; sleep 0.1; echo three"
    )
    chunks = list(alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=T))
    assert b"".join(c.data for c in chunks) == b"one\ntwo\nthree\n"
    resumed = list(alice.StreamOutput(pb.JobRequest(job_id=job_id, offset=chunks[0].offset)))
    assert [(c.stream, c.data, c.offset) for c in resumed] == [
        (c.stream, c.data, c.offset) for c in chunks[1:]
    ]
    assert list(alice.StreamOutput(pb.JobRequest(job_id=job_id, offset=chunks[-1].offset))) == []

    bad = rpc_error(lambda: list(alice.StreamOutput(pb.JobRequest(job_id=job_id, offset=3))))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a chunk boundary" in bad.details()
    beyond = rpc_error(lambda: list(alice.StreamOutput(pb.JobRequest(job_id=job_id, offset=10**9))))
    assert beyond.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "beyond" in beyond.details()


def test_a_followed_stream_asked_with_status_ends_with_the_jobs_status(
    api_server: RunningServer,
) -> None:
    alice = api_server.stub("alice")
    job_id = start_job(alice, "sh", "-c", "echo out; echo err >&2; exit 3")
    asked = pb.JobRequest(job_id=job_id, with_status=True)
    *chunks, end = alice.StreamOutput(asked, timeout=T)
    assert [(c.stream, c.data, c.HasField("status")) for c in chunks] == [
        ("stdout", b"out\n", False),
        ("stderr", b"err\n", False),
    ]
    assert (end.data, end.stream, end.offset) == (b"", "", chunks[-1].offset)
    assert (end.status.status, end.status.reason, end.status.exit_code) == ("exited", "exited", 3)
    assert end.status == alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T)
    # Not asked, or not following: the output alone, as before the field existed.
    for request in (
        pb.JobRequest(job_id=job_id),
        pb.JobRequest(job_id=job_id, with_status=True, no_follow=True),
    ):
        assert len(list(alice.StreamOutput(request, timeout=T))) == len(chunks)


class _Watcher:
    """Records the job service's RPCs; refuses the first status read of the jobs in
    ``hide`` (the one their stream ends with): a server that sends no status there."""

    def __init__(self) -> None:
        self.hide: set[str] = set()
        self.rpcs: list[str] = []

    @hookimpl
    def jobworker_rpc_finished(self, method: str, code: str) -> None:
        self.rpcs.append(f"{method} {code}")

    @hookimpl
    def jobworker_authorize(self, identity: Any, action: Action, job: Any) -> bool | None:
        if action is Action.STATUS and job is not None and job.job_id in self.hide:
            self.hide.remove(job.job_id)
            raise NotFound(f"job {job.job_id} not found")
        return None


def _followed(client: JobClient, job_id: str) -> tuple[list[tuple[str, bytes]], JobEnd]:
    chunks, output = client.follow_to_end(job_id), []
    while True:
        try:
            stream, data, _offset = next(chunks)
        except StopIteration as done:
            return output, done.value
        output.append((stream, bytes(data)))


@pytest.mark.parametrize("sent", [True, False], ids=["end-sent", "end-withheld"])
def test_run_learns_how_the_job_ended_from_the_stream_else_asks(
    api_pki: PkiPaths, sent: bool
) -> None:
    watcher = _Watcher()
    plugins = authz_plugins(api_pki.authz)
    plugins.register(watcher, name="watcher")
    with (
        running_server(api_pki, plugins=plugins) as server,
        JobClient(server.address, api_pki.client("alice")) as alice,
    ):
        job_id = alice.start("sh", ["-c", "echo out; kill -TERM $$"])
        if not sent:
            watcher.hide.add(job_id)
        watcher.rpcs.clear()
        output, end = _followed(alice, job_id)
    assert output == [("stdout", b"out\n")]
    assert end == JobEnd(job_id, "exited", "signaled", 128 + signal.SIGTERM, "")
    calls = ["StreamOutput OK"] if sent else ["GetStatus OK", "StreamOutput OK"]
    assert sorted(watcher.rpcs) == calls


def test_no_follow_returns_what_exists_while_running(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    job_id = start_job(alice, "sh", "-c", "echo first; exec sleep 60")
    wait_for(lambda: alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T).output_bytes > 0)
    assert output_of(alice, job_id, no_follow=True) == [("stdout", b"first\n")]
    assert alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T).status == "running"
    alice.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=1), timeout=T)


def test_concurrent_streams_get_identical_bytes(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    script = (
        "i=0; while [ $i -lt 400 ]; do echo out $i; echo err $i >&2; i=$((i+1)); done;"
        " head -c 3000000 /dev/zero | tr '\\0' x; sleep 0.3; echo end"
    )
    job_id = start_job(alice, "sh", "-c", script)

    def digest(_: int) -> str:
        """sha256 of the output as runs of one stream (chunk boundaries may differ)."""
        stub = api_server.stub("alice")
        sha = hashlib.sha256()
        previous = ""
        for chunk in stub.StreamOutput(pb.JobRequest(job_id=job_id), timeout=30):
            if chunk.stream != previous:
                sha.update(f"\0{chunk.stream}\0".encode())
                previous = chunk.stream
            sha.update(chunk.data)
        return sha.hexdigest()

    with ThreadPoolExecutor(max_workers=5) as pool:
        digests = set(pool.map(digest, range(5)))
    assert len(digests) == 1
    assert digests == {digest(5)}  # and a reader after the end
    status = alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T)
    assert status.output_bytes > 3_000_000


def _spool_descriptors(job_id: str) -> int:
    """Open descriptors of this process on the job's output spool (writer + followers)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.endswith(f"/{job_id}.out")
    return count


async def _rpc_tasks() -> int:
    return sum(1 for t in asyncio.all_tasks() if t is not asyncio.current_task())


def test_client_disconnect_mid_stream_leaves_nothing(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    job_id = start_job(alice, "sh", "-c", "while :; do echo tick; sleep 0.05; done")
    wait_for(lambda: _spool_descriptors(job_id) == 1)
    baseline_tasks = api_server.call(_rpc_tasks())

    call = alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=30)
    assert next(call).data.startswith(b"tick")
    assert _spool_descriptors(job_id) == 2  # the follower's own descriptor
    call.cancel()

    wait_for(lambda: _spool_descriptors(job_id) == 1)  # the follower is gone
    # The baseline may include an RPC that was just finishing; nothing may be added to it.
    wait_for(lambda: api_server.call(_rpc_tasks()) <= baseline_tasks)
    status = alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T)
    assert status.status == "running"
    assert output_of(alice, job_id, no_follow=True)
    alice.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=1), timeout=T)


def test_list_jobs(api_server: RunningServer) -> None:
    bob = api_server.stub("bob")
    job_id = start_job(bob, "true")
    wait_exited(bob, job_id)
    jobs = bob.ListJobs(pb.ListJobsRequest(), timeout=T).jobs
    assert job_id in {j.job_id for j in jobs}
    assert {j.owner for j in jobs} == {"bob"}


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job_id", ["", "no-such-job-but-well-formed", "../../etc/passwd", "x" * 10_000]
)
def test_unknown_or_malformed_job_id_is_not_found(api_server: RunningServer, job_id: str) -> None:
    alice = api_server.stub("alice")
    for call in (
        lambda: alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T),
        lambda: alice.StopJob(pb.JobRequest(job_id=job_id), timeout=T),
        lambda: list(alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=T)),
    ):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert len(err.details()) < 200


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"command": ""}, "command is empty"),
        ({"command": "x" * 5000}, "longer than 4096 bytes"),
        ({"command": "echo", "args": ["a"] * 1025}, "at most 1024"),
        ({"command": "echo", "args": ["a\0b"]}, "NUL"),
        ({"command": "echo", "args": ["x" * 1000] * 300}, "at most 262144"),
        ({"command": "env", "env": {"": "x"}}, "is empty or contains '='"),
        ({"command": "env", "env": {"A=B": "x"}}, "is empty or contains '='"),
        ({"command": "env", "env": {"A": "x\0y"}}, "NUL"),
        ({"command": "pwd", "cwd": "relative/dir"}, "must be an absolute path"),
        ({"command": "true", "limits": pb.Limits(cpu=-1)}, "give a positive number of cores"),
        ({"command": "true", "limits": pb.Limits(cpu=math.inf)}, "finite"),
        ({"command": "true", "limits": pb.Limits(cpu=math.nan)}, "finite"),
        ({"command": "true", "limits": pb.Limits(cpu_weight=20000)}, "between 1 and 10000"),
        ({"command": "true", "limits": pb.Limits(memory_bytes=2**64 - 1)}, "too large"),
        (
            {"command": "true", "limits": pb.Limits(io=[pb.IoDeviceLimit(read_bps=1)])},
            "device is empty",
        ),
        (
            {"command": "true", "limits": pb.Limits(io=[pb.IoDeviceLimit(device="8:0")])},
            "sets no rate",
        ),
        (
            {
                "command": "true",
                "limits": pb.Limits(
                    io=[
                        pb.IoDeviceLimit(device="8:0", read_bps=1),
                        pb.IoDeviceLimit(device="8:0", write_bps=1),
                    ]
                ),
            },
            "more than once",
        ),
    ],
)
def test_bad_input_is_invalid_argument(
    api_server: RunningServer, request_fields: dict[str, Any], message: str
) -> None:
    alice = api_server.stub("alice")
    err = rpc_error(lambda: alice.StartJob(pb.StartJobRequest(**request_fields), timeout=T))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


@pytest.mark.parametrize("grace", [-1.0, math.nan, 1e9])
def test_bad_grace_is_invalid_argument(api_server: RunningServer, grace: float) -> None:
    alice = api_server.stub("alice")
    job_id = start_job(alice, "sleep", "60")
    err = rpc_error(lambda: alice.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=grace)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "between 0 and 3600 seconds" in err.details()
    alice.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=1), timeout=T)


def test_limits_without_containment_plugin_fail_precondition(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    request = pb.StartJobRequest(command="true", limits=pb.Limits(memory_bytes=64 << 20))
    err = rpc_error(lambda: alice.StartJob(request, timeout=T))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--plugin cgroupv2" in err.details()


def test_spawn_error_names_the_os_reason(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    err = rpc_error(lambda: start_job(alice, "/no/such/program"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "No such file or directory" in err.details()


class _BrokenPlugin:
    """A plugin whose bug surfaces inside the job manager."""

    @hookimpl
    def jobworker_pre_spawn(self, job_id: str, spec: JobSpec, owner: str) -> Any:
        return 42  # not a JobSpec


class _ManagerKeeper:
    def __init__(self) -> None:
        self.managers: list[Any] = []

    @hookimpl
    def jobworker_manager_ready(self, manager: Any) -> None:
        self.managers.append(manager)


def test_plugins_get_the_manager_before_requests(api_pki: PkiPaths) -> None:
    keeper = _ManagerKeeper()
    plugins = authz_plugins(api_pki.authz)
    plugins.register(keeper, name="keeper")
    with running_server(api_pki, plugins=plugins) as server:
        assert len(keeper.managers) == 1
        job_id = start_job(server.stub("alice"), "true")
        assert server.call(keeper.managers[0].wait(job_id)).owner == "alice"


def test_unexpected_error_is_internal_without_details(
    api_pki: PkiPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    plugins = authz_plugins(api_pki.authz)
    plugins.register(_BrokenPlugin(), name="broken")
    with running_server(api_pki, plugins=plugins) as server:
        err = rpc_error(lambda: start_job(server.stub("alice"), "true"))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error"
    assert "rpc_internal_error" in capsys.readouterr().out  # the traceback stays here


# -- transport security --------------------------------------------------------------------


def test_plaintext_is_refused(api_server: RunningServer) -> None:
    with grpc.insecure_channel(api_server.address) as channel:
        err = rpc_error(
            lambda: health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=T
            )
        )
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused(
    api_server: RunningServer, api_pki: PkiPaths
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=api_pki.ca_cert.read_bytes())
    channel = api_server.channel(credentials=credentials)
    err = rpc_error(lambda: JobServiceStub(channel).ListJobs(pb.ListJobsRequest(), timeout=T))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_revoked_client_is_unauthenticated_on_every_rpc(api_pki: PkiPaths, tmp_path: Path) -> None:
    alice_cert = x509.load_pem_x509_certificate(api_pki.client_cert("alice").read_bytes())
    crl = write_crl(api_pki.load_ca(), [alice_cert.serial_number], tmp_path / "crl.pem")
    with running_server(api_pki, crl=crl) as server:
        bob = server.stub("bob")
        job_id = start_job(bob, "true")
        alice = server.stub("alice")
        calls = {
            "StartJob": lambda: alice.StartJob(pb.StartJobRequest(command="true"), timeout=T),
            "GetStatus": lambda: alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T),
            "StopJob": lambda: alice.StopJob(pb.JobRequest(job_id=job_id), timeout=T),
            "StreamOutput": lambda: list(alice.StreamOutput(pb.JobRequest(job_id=job_id))),
            "ListJobs": lambda: alice.ListJobs(pb.ListJobsRequest(), timeout=T),
            "Health": lambda: health_pb2_grpc.HealthStub(server.channel("alice")).Check(
                health_pb2.HealthCheckRequest(), timeout=T
            ),
            "Reflection": lambda: list(
                reflection_pb2_grpc.ServerReflectionStub(
                    server.channel("alice")
                ).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=T
                )
            ),
        }
        for rpc, call in calls.items():
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
            assert "revoked" in err.details(), rpc
        assert wait_exited(bob, job_id).exit_code == 0  # others are unaffected


# -- generic tooling -----------------------------------------------------------------------


def test_health_and_reflection(api_server: RunningServer) -> None:
    """They need a valid certificate, not a whitelist entry: mallory may use them."""
    channel = api_server.channel("mallory")
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "jobworker.v1.JobService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=T)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=T
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {"jobworker.v1.JobService", "grpc.health.v1.Health"} <= names


# -- start-up and shutdown -----------------------------------------------------------------


def test_shutdown_stops_jobs_and_removes_the_spool(
    api_pki: PkiPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with running_server(api_pki, default_grace=0.5) as server:
        alice = server.stub("alice")
        [spool] = tmp_path.glob("jobworker-spool-*/run-*")
        assert spool.parent.stat().st_mode & 0o777 == 0o700
        polite = start_job(alice, "sleep", "60")
        stubborn = start_job(alice, "sh", "-c", 'trap "" TERM; echo ready; exec sleep 60')
        follower = alice.StreamOutput(pb.JobRequest(job_id=stubborn), timeout=60)
        assert next(follower).data == b"ready\n"
        pids = [
            alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=T).pid
            for job_id in (polite, stubborn)
        ]
        server.stop()
        assert list(follower) == []  # the follower saw the job end, then the stream closed
    assert all(pid_gone(pid) for pid in pids)
    assert not spool.exists()


def test_signal_stops_the_server(api_pki: PkiPaths, tmp_path: Path) -> None:
    """SIGTERM in the main thread ends ``serve`` normally (as ``jobworker serve`` does)."""
    config = ServerConfig(listen="127.0.0.1:0", tls=api_pki.server(), spool_dir=tmp_path / "s")
    addresses: list[str] = []

    def on_ready(address: str) -> None:
        addresses.append(address)
        threading.Timer(0.2, os.kill, (os.getpid(), 15)).start()

    asyncio.run(serve(config, authz_plugins(api_pki.authz), ready=on_ready))
    assert addresses and addresses[0].startswith("127.0.0.1:")
    assert list((tmp_path / "s").iterdir()) == []  # its run directory went with it


def test_refuses_to_start_on_bad_tls_files(api_pki: PkiPaths, tmp_path: Path) -> None:
    files = api_pki.server()
    missing = TlsFiles(cert=tmp_path / "nope.pem", key=files.key, ca=files.ca)
    with pytest.raises(ConfigError, match=r"nope\.pem does not exist"):
        asyncio.run(serve(ServerConfig(tls=missing), authz_plugins(api_pki.authz)))


def test_refuses_a_busy_port(api_server: RunningServer, api_pki: PkiPaths) -> None:
    with (
        pytest.raises(
            ConfigError,
            match=rf"^{api_server.address} is already in use \(another jobworker serve\?\);"
            " pick another with --listen$",
        ),
        running_server(api_pki, listen=api_server.address),
    ):
        pass


def test_refuses_to_start_without_authorization(api_pki: PkiPaths) -> None:
    plugins = Plugins()
    with pytest.raises(ConfigError, match="no authorization plugin"):
        asyncio.run(serve(ServerConfig(tls=api_pki.server()), plugins))
    plugins.load(["authz"])
    with pytest.raises(ConfigError, match="no authorization whitelist"):
        plugins.configure(argparse.Namespace(authz=None))


def test_refuses_to_start_without_isolation(api_pki: PkiPaths) -> None:
    plugins = Plugins()
    plugins.register(Authz.from_file(api_pki.authz), name="authz")
    with pytest.raises(ConfigError, match="no isolation plugin is loaded"):
        asyncio.run(serve(ServerConfig(tls=api_pki.server()), plugins))

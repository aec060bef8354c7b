"""Hostile conditions against a real server over mTLS on 127.0.0.1: load, faults, bad input.

Where a test must signal or kill the server, or read its descriptors and children from
/proc, the server is ``jobworker serve`` in a process of its own (:class:`ServeProcess`);
otherwise the in-process server of tests/serverfixtures.py is enough.

What "nothing left" means here: no job process alive, no zombie child of the server, no
pipe or pidfd of a finished job still open in the server, and no spool file once the server
has stopped. A *retained* finished job keeps its spool file (and one descriptor on it) until
the retention bound evicts it, by design: its output can still be read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobworker.api.pki import PkiPaths
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.jobpaths import JOB_VISIBLE_ROOT
from tests.serverfixtures import (
    RPC_TIMEOUT_S,
    RunningServer,
    client_credentials,
    running_server,
    start_job,
    wait_exited,
)

#: Status codes a bad request may get; anything else (INTERNAL, UNKNOWN, a deadline) fails.
PROPER_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
SERVER_START_S = 120.0  # a deadline for a failure, not a target: a loaded machine is slow


# -- a server in a process of its own -----------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int]:
    """(state, ppid) of ``pid``; raises FileNotFoundError once it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return _proc_stat(pid)[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class ServeProcess:
    """``jobworker serve`` as a subprocess, listening on an ephemeral port of 127.0.0.1."""

    def __init__(
        self,
        pki: PkiPaths,
        spool_dir: Path,
        log_path: Path,
        grace: float = 2.0,
        extra: tuple[str, ...] = (),
    ):
        self.pki = pki
        self.spool_dir = spool_dir
        self.log_path = log_path
        files = pki.server()
        args = ["serve", "--listen", "127.0.0.1:0", "--spool-dir", str(spool_dir)]
        args += ["--tls-cert", str(files.cert), "--tls-key", str(files.key)]
        args += ["--tls-ca", str(files.ca), "--authz", str(pki.authz), "--grace", str(grace)]
        args += ["--isolation-writable", str(JOB_VISIBLE_ROOT), *extra]
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jobworker", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.address = self._wait_started()
        self._channels: list[grpc.Channel] = []

    def _wait_started(self) -> str:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") == "server_started":
                        address: str = event["address"]
                        return address
            assert self.proc.poll() is None, f"server exited:\n{self.log_path.read_text()}"
            time.sleep(0.05)
        raise AssertionError(f"server did not start:\n{self.log_path.read_text()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def run_dir(self) -> Path:
        """This server's own spool directory under ``spool_dir`` (see jobworker.backends.local.spool)."""
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "server_started" and event.get("pid") == self.pid:
                    return Path(event["spool_dir"])
        raise AssertionError("no server_started line with this server's spool directory")

    def stub(self, name: str) -> pb_grpc.JobServiceStub:
        channel = grpc.secure_channel(self.address, client_credentials(self.pki.client(name)))
        self._channels.append(channel)
        return pb_grpc.JobServiceStub(channel)

    def fds(self) -> list[str]:
        """What each open descriptor of the server points at."""
        targets = []
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                targets.append(os.readlink(f"/proc/{self.pid}/fd/{name}"))
        return targets

    def children(self) -> dict[int, str]:
        """pid -> state of every child of the server."""
        found = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    state, ppid = _proc_stat(int(entry))
                    if ppid == self.pid:
                        found[int(entry)] = state
        return found

    def rss(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) * 1024
        return values["VmRSS"], values["VmHWM"]

    def close_channels(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()

    def terminate(self, timeout: float = 60.0) -> int:
        self.close_channels()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.close_channels()
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def serve_process(api_pki: PkiPaths, tmp_path: Path) -> Iterator[Any]:
    """A factory of ``jobworker serve`` processes; each is stopped (or killed) at the end."""
    started: list[ServeProcess] = []

    def start(grace: float = 2.0, extra: tuple[str, ...] = ()) -> ServeProcess:
        server = ServeProcess(
            api_pki, tmp_path / "spool", tmp_path / f"server-{len(started)}.log", grace, extra
        )
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.kill()


def job_pids(stub: pb_grpc.JobServiceStub, job_ids: list[str]) -> list[int]:
    return [stub.GetStatus(pb.JobRequest(job_id=j), timeout=RPC_TIMEOUT_S).pid for j in job_ids]


def kill_group(pid: int) -> None:
    """Clean-up after a test that left a job behind on purpose (each job has its own group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def sha256_of_stream(
    stub: pb_grpc.JobServiceStub, job_id: str, timeout: float = 120
) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in stub.StreamOutput(pb.JobRequest(job_id=job_id), timeout=timeout):
        assert chunk.stream == "stdout", chunk.data[:200]
        digest.update(chunk.data)
        size += len(chunk.data)
    return digest.hexdigest(), size


# -- load ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_200_jobs_each_streamed_by_two_clients_lose_nothing_and_leave_nothing(
    serve_process: Any, job_tmp_path: Path
) -> None:
    server: ServeProcess = serve_process()
    alice, root = server.stub("alice"), server.stub("root")
    # Warm up every code path that opens descriptors for good (channels, the spawn helper).
    warm = start_job(alice, "true")
    wait_exited(alice, warm)
    wait_exited(root, warm)
    baseline = server.fds()
    out = job_tmp_path / "written"
    out.mkdir(mode=0o777)
    out.chmod(0o777)

    def start(i: int) -> str:
        # The pause lets all 200 run at once, with most followers attached before output.
        size = random.randint(1, 400_000)
        script = f"sleep 3; head -c {size} /dev/urandom | tee {out}/{i}; sleep 0.$((RANDOM % 5))"
        return start_job(alice, "bash", "-c", script)

    with ThreadPoolExecutor(16) as pool:
        jobs = list(pool.map(start, range(200)))
    streams = [(alice, j) for j in jobs] + [(root, j) for j in jobs]
    random.shuffle(streams)
    with ThreadPoolExecutor(100) as pool:
        digests = list(pool.map(lambda s: (s[1], sha256_of_stream(*s)), streams))

    for job_id, (digest, size) in digests:
        i = jobs.index(job_id)
        written = (out / str(i)).read_bytes()
        assert (digest, size) == (hashlib.sha256(written).hexdigest(), len(written)), i
        status = alice.GetStatus(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        assert (status.status, status.exit_code, status.output_bytes > 0) == ("exited", 0, True)

    spool = sorted(p.name for p in server.run_dir.iterdir())
    assert spool == sorted([".lock", *(f"{j}.out" for j in [warm, *jobs])]), "stray files"
    wait_for(lambda: _only_helpers(server), 10, "children reaped")
    assert [s for s in server.children().values() if s == "Z"] == [], "zombies"
    now = server.fds()
    extra = _multiset_minus(now, baseline)
    # A retained finished job holds no descriptor: nothing may remain.
    assert extra == [], extra

    assert server.terminate() == 0
    assert list(server.spool_dir.iterdir()) == []


def _only_helpers(server: ServeProcess) -> bool:
    """The spawn helper (zygote) and the ingest process are the children a server keeps
    while no job runs."""
    children = server.children()
    if "Z" in children.values():
        return False
    names = sorted(_command_of(pid) for pid in children)
    return all(name in ("jobworker-ingest", "zygote") for name in names) and len(names) <= 2


def _command_of(pid: int) -> str:
    """``jobworker-ingest`` for the ingest process, ``zygote`` for the other helper."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return "gone"
    return "jobworker-ingest" if b"jobworker-ingest" in argv else "zygote"


def _multiset_minus(a: list[str], b: list[str]) -> list[str]:
    rest = list(a)
    for item in b:
        if item in rest:
            rest.remove(item)
    return rest


# -- faults ----------------------------------------------------------------------------------


def test_follower_disconnecting_mid_stream_hurts_no_one(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    size = 32 << 20
    job = start_job(alice, "head", "-c", str(size), "/dev/zero")
    for _ in range(5):  # several followers leave at different points
        call = alice.StreamOutput(pb.JobRequest(job_id=job), timeout=RPC_TIMEOUT_S)
        for n, _chunk in enumerate(call):
            if n == random.randint(0, 20):
                break
        call.cancel()
    digest, got = sha256_of_stream(alice, job)
    assert got == size
    assert digest == hashlib.sha256(bytes(size)).hexdigest()
    status = alice.GetStatus(pb.JobRequest(job_id=job), timeout=RPC_TIMEOUT_S)
    assert (status.status, status.exit_code, status.output_bytes) == ("exited", 0, size)


@pytest.mark.slow
def test_client_that_stops_reading_holds_no_memory_and_no_one_back(serve_process: Any) -> None:
    server: ServeProcess = serve_process()
    alice = server.stub("alice")
    wait_exited(alice, start_job(alice, "head", "-c", str(8 << 20), "/dev/zero"))
    rss_before, _ = server.rss()
    size = 256 << 20  # some 50 times what grpc buffers for a stream nobody reads
    job = start_job(alice, "head", "-c", str(size), "/dev/zero")
    stalled = alice.StreamOutput(pb.JobRequest(job_id=job), timeout=600)
    next(stalled)  # then never read again
    # No one held back: another stream gets all of it while the stalled one stays open.
    digest, got = sha256_of_stream(server.stub("root"), job, timeout=600)
    assert got == size and digest == hashlib.sha256(bytes(size)).hexdigest()
    _, hwm = server.rss()
    assert hwm - rss_before < 50 << 20, f"server grew by {(hwm - rss_before) >> 20} MiB"
    status = alice.GetStatus(pb.JobRequest(job_id=job), timeout=RPC_TIMEOUT_S)
    assert (status.status, status.exit_code) == ("exited", 0)
    stalled.cancel()


def test_job_closing_its_output_early_keeps_running(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    job = start_job(alice, "sh", "-c", "echo before; exec >&- 2>&-; sleep 1; exit 3")
    began = time.monotonic()
    chunks = list(alice.StreamOutput(pb.JobRequest(job_id=job), timeout=RPC_TIMEOUT_S))
    assert b"".join(c.data for c in chunks) == b"before\n"
    assert time.monotonic() - began >= 0.9, "the stream ended before the job did"
    status = alice.GetStatus(pb.JobRequest(job_id=job), timeout=RPC_TIMEOUT_S)
    assert (status.status, status.reason, status.exit_code) == ("exited", "exited", 3)


def test_job_ignoring_sigterm_is_killed_after_the_grace(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    job = start_job(alice, "sh", "-c", "trap '' TERM; echo ready; sleep 60")
    next(iter(alice.StreamOutput(pb.JobRequest(job_id=job), timeout=RPC_TIMEOUT_S)))
    pid = job_pids(alice, [job])[0]
    began = time.monotonic()
    reply = alice.StopJob(pb.JobRequest(job_id=job, grace_seconds=0.5), timeout=RPC_TIMEOUT_S)
    assert 0.5 <= time.monotonic() - began < 5
    assert reply.escalated and reply.status.signal == signal.SIGKILL
    assert (reply.status.reason, reply.status.stopped_by) == ("stopped", "alice")
    assert not alive(pid)


def test_job_exiting_while_being_stopped(api_server: RunningServer) -> None:
    alice = api_server.stub("alice")
    # Exits by itself, 0.2 s into the grace period.
    job = start_job(alice, "sh", "-c", "trap 'sleep 0.2; exit 7' TERM; echo ready; sleep 60 & wait")
    next(iter(alice.StreamOutput(pb.JobRequest(job_id=job), timeout=RPC_TIMEOUT_S)))
    reply = alice.StopJob(pb.JobRequest(job_id=job, grace_seconds=5), timeout=RPC_TIMEOUT_S)
    assert (reply.status.exit_code, reply.escalated, reply.status.reason) == (7, False, "stopped")

    # Races: stops landing just before, during and after the job's own exit.
    def race(delay: float) -> tuple[str, pb.JobResponse]:
        job = start_job(alice, "sleep", "0.1")
        time.sleep(delay)
        reply = alice.StopJob(pb.JobRequest(job_id=job, grace_seconds=1), timeout=RPC_TIMEOUT_S)
        return job, reply

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(race, [random.uniform(0, 0.25) for _ in range(40)]))
    for job, reply in replies:
        assert reply.success and reply.status.status == "exited"
        assert reply.status.reason in ("exited", "stopped")
        status = alice.GetStatus(pb.JobRequest(job_id=job), timeout=RPC_TIMEOUT_S)
        assert status.status == "exited" and not alive(status.pid)


@pytest.mark.slow
def test_sigterm_with_50_jobs_running_stops_them_all_and_exits_0(serve_process: Any) -> None:
    server: ServeProcess = serve_process(grace=1.0)
    alice = server.stub("alice")
    with ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(lambda _: start_job(alice, "sleep", "600"), range(45)))
        jobs += list(
            pool.map(lambda _: start_job(alice, "sh", "-c", "trap '' TERM; sleep 600"), range(5))
        )
    pids = job_pids(alice, jobs)
    assert all(alive(p) for p in pids)
    began = time.monotonic()
    assert server.terminate() == 0
    assert time.monotonic() - began < 30
    left = [p for p in pids if alive(p)]
    for pid in left:
        kill_group(pid)
    assert left == []
    assert list(server.spool_dir.iterdir()) == []


@pytest.mark.slow
def test_sigkill_then_restart(serve_process: Any, tmp_path: Path) -> None:
    """A SIGKILLed server runs no clean-up. Without the cgroupv2 plugin its jobs are plain
    process groups that nothing tracks once it is gone: they live on (documented in
    docs/performance.md). Its spool run is reclaimed by the next server on the same spool
    root, whose own jobs work as usual."""
    server: ServeProcess = serve_process()
    alice = server.stub("alice")
    jobs = [start_job(alice, "sleep", "600") for _ in range(5)]
    pids = job_pids(alice, jobs)
    killed_run = server.run_dir
    assert sorted(p.name for p in killed_run.iterdir()) == sorted(
        [".lock", *(f"{j}.out" for j in jobs)]
    )
    server.kill()
    try:
        restarted: ServeProcess = serve_process()
        alice = restarted.stub("alice")
        job = start_job(alice, "echo", "fine")
        assert [c.data for c in alice.StreamOutput(pb.JobRequest(job_id=job))] == [b"fine\n"]
        with pytest.raises(grpc.RpcError) as err:
            alice.GetStatus(pb.JobRequest(job_id=jobs[0]), timeout=RPC_TIMEOUT_S)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        orphans = [p for p in pids if alive(p)]
        runs = list(restarted.spool_dir.iterdir())
        restarted_run = restarted.run_dir
        assert restarted.terminate() == 0
    finally:
        for pid in pids:
            kill_group(pid)
    # What the process-group fallback leaves after SIGKILL (asserted so a change is noticed).
    assert orphans == pids
    assert not killed_run.exists()  # the restarted server reclaimed the dead one's output
    assert runs == [restarted_run]


# -- bad input -------------------------------------------------------------------------------

_texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=300),
    st.sampled_from(["", "\0", "a\0b", "=", "/", ".."]),
    st.sampled_from([4097, 300_000]).map(lambda n: "x" * n),
)
# Never a name the shell's PATH could resolve to a real program with random arguments.
_commands = st.one_of(
    st.sampled_from(["true", "echo", "", "\0", "/nonexistent", "/dev/null", "/"]),
    _texts.map(lambda s: "/nonexistent/" + s),
)
_uint64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]))
_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e300, math.nan, math.inf, -math.inf]),
)
_limits = st.builds(
    pb.Limits,
    cpu=_floats,
    memory_bytes=_uint64,
    pids=_uint64,
    cpu_weight=st.integers(0, 2**32 - 1),
    memory_high_bytes=_uint64,
    io=st.lists(
        st.builds(
            pb.IoDeviceLimit,
            device=_texts,
            read_bps=_uint64,
            write_bps=_uint64,
            read_iops=_uint64,
            write_iops=_uint64,
        ),
        max_size=3,
    ),
)
_start_requests = st.builds(
    pb.StartJobRequest,
    command=_commands,
    args=st.lists(_texts, max_size=5) | st.just(2000).map(lambda n: ["x"] * n),
    env=st.dictionaries(_texts, _texts, max_size=4),
    cwd=st.one_of(_texts, st.sampled_from(["/", "/tmp", "relative", "/nonexistent"])),
    limits=st.one_of(st.none(), _limits),
)

_FUZZ = settings(
    max_examples=700,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)


@attrs.frozen
class Fuzzed:
    server: RunningServer
    spool: Path
    finished: str  # a finished job of bob's with output on both streams
    channel: grpc.Channel  # bob's
    bob: pb_grpc.JobServiceStub
    root: pb_grpc.JobServiceStub


@pytest.fixture(scope="module")
def fuzz_server(api_pki: PkiPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    spool = tmp_path_factory.mktemp("fuzz") / "spool"
    with running_server(api_pki, spool_dir=spool, default_grace=0.5) as server:
        channel = server.channel("bob")
        bob = pb_grpc.JobServiceStub(channel)
        finished = start_job(bob, "sh", "-c", "echo out; echo err >&2; echo more")
        wait_exited(bob, finished)
        yield Fuzzed(server, spool, finished, channel, bob, server.stub("root"))
        assert_healthy(server)


def assert_proper(err: grpc.RpcError, request: Any) -> None:
    assert err.code() in PROPER_ERRORS, f"{err.code()}: {err.details()} for {request!r:.500}"
    assert err.details(), "an error without a message"


def assert_healthy(server: RunningServer) -> None:
    """A real job still starts, runs and streams after the abuse."""
    root = server.stub("root")
    job = start_job(root, "echo", "healthy")
    assert [c.data for c in root.StreamOutput(pb.JobRequest(job_id=job))] == [b"healthy\n"]


def bob_jobs(bob: pb_grpc.JobServiceStub) -> set[str]:
    reply = bob.ListJobs(pb.ListJobsRequest(), timeout=RPC_TIMEOUT_S)
    return {j.job_id for j in reply.jobs}


@_FUZZ
@given(request=_start_requests)
def test_start_job_bad_input_gets_an_error_or_a_whole_job(
    fuzz_server: Fuzzed, request: Any
) -> None:
    bob = fuzz_server.bob
    before = bob_jobs(bob)
    try:
        job_id = bob.StartJob(request, timeout=RPC_TIMEOUT_S).job_id
    except grpc.RpcError as err:
        assert_proper(err, request)
        assert bob_jobs(bob) == before, "a refused start left a job"
    else:
        status = bob.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=0), timeout=RPC_TIMEOUT_S)
        assert status.status.status == "exited" and status.status.job_id == job_id
        assert bob_jobs(bob) == before | {job_id}
    spooled = {p.name.removesuffix(".out") for p in fuzz_server.spool.glob("run-*/*.out")}
    every_job = fuzz_server.root.ListJobs(pb.ListJobsRequest(), timeout=RPC_TIMEOUT_S).jobs
    assert spooled <= {j.job_id for j in every_job}, "a spool file of no job"


_job_ids = st.one_of(
    _texts,
    st.sampled_from(["", "0", "-", "a" * 64, "a" * 65, "../x", "job\0id"]),
    st.just("FINISHED"),
)


@_FUZZ
@given(
    rpc=st.sampled_from(["GetStatus", "StopJob", "StreamOutput"]),
    job_id=_job_ids,
    offset=_uint64 | st.integers(0, 64),
    grace=st.none() | _floats,
    no_follow=st.booleans(),
)
def test_job_requests_with_bad_fields_get_proper_errors(
    fuzz_server: Fuzzed, rpc: str, job_id: str, offset: int, grace: float | None, no_follow: bool
) -> None:
    if job_id == "FINISHED":
        job_id = fuzz_server.finished
    request = pb.JobRequest(job_id=job_id, offset=offset, grace_seconds=grace, no_follow=no_follow)
    call = getattr(fuzz_server.bob, rpc)
    try:
        reply = call(request, timeout=RPC_TIMEOUT_S)
        if rpc == "StreamOutput":
            data = b"".join(c.data for c in reply)
            assert data in (b"out\nmore\n", b"more\n", b"") or data.endswith(b"\n")
    except grpc.RpcError as err:
        assert_proper(err, request)


_METHODS = ["StartJob", "GetStatus", "StopJob", "StreamOutput", "ListJobs"]
#: Not protobuf, and a string field holding bytes that are not UTF-8 (proto3 forbids them).
_UNDECODABLE = [b"\x00", b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x0a\x03a\xc3("]


def _raw_call(channel: grpc.Channel, rpc: str, payload: bytes) -> None:
    method = f"/jobworker.v1.JobService/{rpc}"
    if rpc == "StreamOutput":
        for _ in channel.unary_stream(method)(payload, timeout=RPC_TIMEOUT_S):
            pass
    else:
        channel.unary_unary(method)(payload, timeout=RPC_TIMEOUT_S)


@_FUZZ
@given(
    rpc=st.sampled_from(_METHODS), payload=st.binary(max_size=200) | st.sampled_from(_UNDECODABLE)
)
def test_raw_bytes_never_crash_or_hang_the_server(
    fuzz_server: Fuzzed, rpc: str, payload: bytes
) -> None:
    """Whatever the bytes, an answer comes, and it is a proper one."""
    try:
        _raw_call(fuzz_server.channel, rpc, payload)
    except grpc.RpcError as err:
        assert_proper(err, payload)


@pytest.mark.parametrize("payload", _UNDECODABLE)
@pytest.mark.parametrize("rpc", _METHODS[:4])
def test_undecodable_request_is_invalid_argument(
    fuzz_server: Fuzzed, rpc: str, payload: bytes
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _raw_call(fuzz_server.channel, rpc, payload)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid" in (err.value.details() or "")


def test_server_healthy_after_fuzzing(fuzz_server: Fuzzed) -> None:
    assert_healthy(fuzz_server.server)
    threads = threading.active_count()
    assert threads < 100


@pytest.mark.slow
def test_sigkill_then_restart_with_cgroupv2_kills_the_leftovers(
    serve_process: Any, tmp_path: Path
) -> None:
    """With the cgroupv2 plugin (here: the hybrid host's /sys/fs/cgroup/unified, or a pure
    cgroup v2 host) every job is in a cgroup, which outlives the server: the restarted
    server finds the previous server's job cgroups at start-up and ``cgroup.kill``s them."""
    root = _cgroup_root()
    extra = ("--plugin", "cgroupv2", "--cgroup-root", str(root))
    try:
        server: ServeProcess = serve_process(extra=extra)
    except AssertionError as err:
        pytest.skip(f"the cgroupv2 plugin cannot run here: {str(err)[-300:]}")
    alice = server.stub("alice")
    jobs = [start_job(alice, "sh", "-c", "setsid sleep 600 & sleep 600") for _ in range(3)]
    pids = job_pids(alice, jobs)
    server.kill()
    try:
        assert all(alive(p) for p in pids)
        restarted: ServeProcess = serve_process(extra=extra)
        wait_for(lambda: not any(alive(p) for p in pids), 10, "leftover jobs killed")
        assert restarted.terminate() == 0
    finally:
        for pid in pids:
            kill_group(pid)
        # The restarted server did not create the root (the killed one did), so it leaves it.
        for directory in sorted(root.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
    assert not root.exists()


def _cgroup_root() -> Path:
    unified = Path("/sys/fs/cgroup/unified")
    base = unified if (unified / "cgroup.procs").exists() else Path("/sys/fs/cgroup")
    return base / f"jobworker-test-{os.getpid()}"

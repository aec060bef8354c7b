"""``jobworker serve --live-restore``: real servers stopped and killed with real signals,
real jobs left running, adopted by the next server (docs/upgrading.md)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobworker.api import tls  # isort: split

import grpc

from jobworker.api.tlsfiles import TlsFiles
from jobworker.backends.local.cgroupfs import mark_ours
from jobworker.backends.local.handover import take_over
from jobworker.backends.local.spool import LIVE_RUN
from jobworker.client import channel_credentials
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.e2e.conftest import JOBWORKER, Pki, Server, StartServer, clean_env, free_port
from tests.jobpaths import JOB_VISIBLE_ROOT

assert tls  # imported first for grpc's TLS 1.3 settings

RPC_TIMEOUT_S = 30.0
#: How long a restarted server may take to answer, from its start (interpreter included).
ANSWER_DEADLINE_S = 30.0


def _stub(pki: Pki, address: str, name: str = "alice") -> pb_grpc.JobServiceStub:
    d = pki.directory
    files = TlsFiles(cert=d / f"{name}.pem", key=d / f"{name}-key.pem", ca=d / "ca.pem")
    return pb_grpc.JobServiceStub(grpc.secure_channel(address, channel_credentials(files)))


class LiveServer:
    """``jobworker serve --live-restore`` on one spool directory, restarted at will."""

    def __init__(self, start: StartServer, pki: Pki, spool: Path, *extra: str) -> None:
        self._start = start
        self._pki = pki
        self.address = f"127.0.0.1:{free_port()}"  # the same for every run, as in production
        self.args = [
            f"--listen={self.address}",
            "--live-restore",
            *pki.server_args(),
            f"--spool-dir={spool}",
            f"--isolation-writable={JOB_VISIBLE_ROOT}",
            *extra,
        ]
        self.spool = spool
        self.server = self.restart()

    def restart(self) -> Server:
        self.server = self._start(*self.args)
        self.stub = _stub(self._pki, self.address)
        return self.server

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Signal the server and wait until it is gone."""
        self.server.process.send_signal(signum)
        self.server.process.wait(60)

    def start(self, *command: str) -> str:
        reply = self.stub.StartJob(
            pb.StartJobRequest(command=command[0], args=command[1:]), timeout=RPC_TIMEOUT_S
        )
        job_id: str = reply.job_id
        return job_id

    def status(self, job_id: str) -> pb.JobStatusResponse:
        status: pb.JobStatusResponse = self.stub.GetStatus(
            pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S
        )
        return status

    def output(self, job_id: str, offset: int = 0) -> Iterator[pb.JobOutputChunk]:
        chunks: Iterator[pb.JobOutputChunk] = self.stub.StreamOutput(
            pb.JobRequest(job_id=job_id, offset=offset), timeout=600
        )
        return chunks

    def wait(self, job_id: str) -> pb.JobStatusResponse:
        for _ in self.output(job_id):
            pass
        return self.status(job_id)

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.server.events() if e.get("event") == name]

    def close(self) -> None:
        """Leave nothing running: a server adopts what is left, stops every job, and the
        ingest process it leaves behind on SIGTERM is taken over, which ends it."""
        if self.server.process.poll() is not None:
            self.restart()
        for job in self.stub.ListJobs(pb.ListJobsRequest(), timeout=RPC_TIMEOUT_S).jobs:
            if job.status == "running":
                self.stub.StopJob(
                    pb.JobRequest(job_id=job.job_id, grace_seconds=0), timeout=RPC_TIMEOUT_S
                )
        helpers = _ingest_processes_of(Path(__file__).resolve().parents[2], self.server.process.pid)
        self.kill(signal.SIGTERM)
        handed = asyncio.run(take_over(self.spool / LIVE_RUN))
        for log in (handed or {}).values():
            log.close()
        _wait_until(lambda: not any(_alive(pid) for pid in helpers))


@pytest.fixture
def live(
    start_server: StartServer, pki: Pki, tmp_path: Path
) -> Iterator[Callable[..., LiveServer]]:
    made: list[LiveServer] = []

    def make(*extra: str) -> LiveServer:
        made.append(LiveServer(start_server, pki, tmp_path / "spool", *extra))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _stream_sha(server: LiveServer, job_id: str, stop_after: int | None = None) -> tuple[str, int]:
    """sha256 and length of the job's stdout from offset 0 (the first ``stop_after``
    bytes or more, when given)."""
    digest = hashlib.sha256()
    total = 0
    for chunk in server.output(job_id):
        assert chunk.stream == "stdout"
        digest.update(chunk.data)
        total += len(chunk.data)
        if stop_after is not None and total >= stop_after:
            break
    return digest.hexdigest(), total


def _file_sha(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest(), path.stat().st_size


def _sigkill_mid_stream(live: Callable[..., LiveServer], tmp_path: Path, size: str) -> None:
    JOB_VISIBLE_ROOT.mkdir(parents=True, exist_ok=True)
    copy = JOB_VISIBLE_ROOT / f"live-restore-{os.getpid()}-{tmp_path.name}.bin"
    server = live("--no-isolation")
    try:
        job = server.start("sh", "-c", f"head -c {size} /dev/urandom | tee {copy}")
        _stream_sha(server, job, stop_after=8 << 20)  # a follower mid-stream
        server.kill()
        time.sleep(1.0)  # the job goes on writing while no server runs
        server.restart()
        assert server.wait(job).reason == "exited"
        assert _stream_sha(server, job) == _file_sha(copy)
        assert not server.events("ingest_process_gone")
    finally:
        copy.unlink(missing_ok=True)


def test_sigkill_in_the_middle_of_a_stream_loses_no_byte(
    live: Callable[..., LiveServer], tmp_path: Path
) -> None:
    _sigkill_mid_stream(live, tmp_path, "256M")


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_1gib_stream_loses_no_byte(
    live: Callable[..., LiveServer], tmp_path: Path
) -> None:
    _sigkill_mid_stream(live, tmp_path, "1G")


@pytest.mark.parametrize("isolation", [[], ["--no-isolation"]], ids=["isolated", "plain"])
def test_a_job_that_exits_while_no_server_runs_reports_its_exit_code(
    live: Callable[..., LiveServer], isolation: list[str]
) -> None:
    server = live(*isolation)
    job = server.start("sh", "-c", "echo before; sleep 1; echo after; exit 7")
    server.kill()
    time.sleep(2.0)
    server.restart()
    status = server.wait(job)
    assert (status.reason, status.exit_code, status.signal) == ("exited", 7, 0)
    assert b"".join(c.data for c in server.output(job)) == b"before\nafter\n"


def test_a_job_ignoring_sigterm_is_stopped_whole_after_adoption(
    live: Callable[..., LiveServer],
) -> None:
    server = live("--no-isolation")
    script = 'trap "" TERM; sleep 1000 & echo $$ $!; wait'
    job = server.start("sh", "-c", script)
    first = next(iter(server.output(job))).data.split()
    pids = [int(p) for p in first]
    server.kill(signal.SIGTERM)
    assert all(_alive(pid) for pid in pids), "SIGTERM with --live-restore stopped the job"
    server.restart()
    assert server.status(job).status == "running"
    reply = server.stub.StopJob(pb.JobRequest(job_id=job, grace_seconds=0.5), timeout=RPC_TIMEOUT_S)
    assert reply.escalated
    assert server.status(job).reason == "stopped"
    _wait_until(lambda: not any(_alive(pid) for pid in pids))


def test_sigterm_without_live_restore_still_stops_jobs(
    start_server: StartServer, pki: Pki, tmp_path: Path
) -> None:
    server = start_server(*pki.server_args(), f"--spool-dir={tmp_path / 's'}", "--no-isolation")
    stub = _stub(pki, server.address)
    job = stub.StartJob(pb.StartJobRequest(command="sleep", args=["1000"]), timeout=RPC_TIMEOUT_S)
    pid = stub.GetStatus(pb.JobRequest(job_id=job.job_id), timeout=RPC_TIMEOUT_S).pid
    assert server.terminate() == 0
    assert not _alive(pid)
    assert not list((tmp_path / "s").iterdir()), "a server without --live-restore left files"


def test_status_owner_quota_and_finished_jobs_survive_a_restart(
    live: Callable[..., LiveServer],
) -> None:
    server = live("--max-jobs-per-client=2")
    done = server.start("sh", "-c", "echo finished; exit 3")
    server.wait(done)
    running = server.start("sleep", "1000")
    before = server.status(running)
    server.kill(signal.SIGTERM)
    server.restart()
    after = server.status(running)
    for field in ("status", "owner", "pid", "uid", "user", "isolation", "containment"):
        assert getattr(after, field) == getattr(before, field), field
    assert after.started_at == pytest.approx(before.started_at)
    finished = server.status(done)
    assert (finished.reason, finished.exit_code) == ("exited", 3)
    assert b"".join(c.data for c in server.output(done)) == b"finished\n"
    server.start("sleep", "1000")  # the second of two
    with pytest.raises(grpc.RpcError) as refused:
        server.start("sleep", "1000")
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def _rewrite(record: Path, **fields: object) -> None:
    data = json.loads(record.read_text())
    data.update(fields)
    record.write_text(json.dumps(data))


def test_a_record_naming_another_process_is_refused(
    live: Callable[..., LiveServer],
) -> None:
    server = live("--no-isolation")
    job = server.start("sleep", "1000")
    real = server.status(job).pid
    server.kill()
    victim = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    try:
        record = server.spool / "live" / f"{job}.job"
        data = json.loads(record.read_text())
        _rewrite(record, process={**data["process"], "pid": victim.pid})
        server.restart()
        status = server.wait(job)
        assert status.reason == "lost"
        assert status.exit_code == -1
        [refusal] = server.events("job_not_adopted")
        assert f"pid {victim.pid} now belongs to another process" in str(refusal["reason"])
        assert victim.poll() is None, "the process the record was tampered to name was hit"
    finally:
        victim.kill()
        victim.wait()
        os.killpg(real, signal.SIGKILL)  # the real job: a process group no record names


def test_a_record_of_an_unknown_version_is_refused(live: Callable[..., LiveServer]) -> None:
    server = live("--no-isolation")
    job = server.start("sleep", "1000")
    pid = server.status(job).pid
    server.kill()
    _rewrite(server.spool / "live" / f"{job}.job", version=99)
    try:
        server.restart()
        [refusal] = server.events("job_record_refused")
        assert "version 99" in str(refusal["error"])
        with pytest.raises(grpc.RpcError) as unknown:
            server.status(job)
        assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        os.killpg(pid, signal.SIGKILL)


def test_a_restart_under_many_running_jobs_adopts_them_all(
    live: Callable[..., LiveServer],
) -> None:
    server = live("--no-isolation")
    jobs = [server.start("sh", "-c", "echo up; exec sleep 1000") for _ in range(30)]
    for job in jobs:
        next(iter(server.output(job)))
    server.kill()
    started = time.monotonic()
    server.restart()
    stub = server.stub
    listed = stub.ListJobs(pb.ListJobsRequest(), timeout=RPC_TIMEOUT_S)
    assert time.monotonic() - started < ANSWER_DEADLINE_S
    assert {j.job_id for j in listed.jobs if j.status == "running"} == set(jobs)
    [restored] = server.events("jobs_restored")
    assert (restored["running"], restored["lost"]) == (30, 0)
    for job in jobs:
        stub.StopJob(pb.JobRequest(job_id=job, grace_seconds=0), timeout=RPC_TIMEOUT_S)
        assert server.status(job).reason == "stopped"


#: Writes 0..59, one line every 0.1 s, then says so on stderr and exits 7.
_COUNTING = (
    "i=0; while [ $i -lt 60 ]; do echo $i; i=$((i+1)); sleep 0.1; done; echo end >&2; exit 7"
)


@pytest.mark.parametrize("command", ["logs", "run"])
def test_logs_follow_and_run_resume_by_themselves_across_a_restart(
    live: Callable[..., LiveServer], pki: Pki, command: str
) -> None:
    server = live("--no-isolation")
    if command == "logs":
        argv = ["logs", "-f", server.start("sh", "-c", _COUNTING)]
    else:
        argv = ["run", "--", "sh", "-c", _COUNTING]
    env = pki.client_env("alice", server.address)
    follower = subprocess.Popen(
        [JOBWORKER, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert follower.stdout is not None
    # The job runs: its first lines came through. Read from the descriptor, as communicate()
    # does below: a buffered read could keep more than it returns, and communicate() would
    # never see those bytes (a line "missing" that the client did write).
    head = os.read(follower.stdout.fileno(), 1 << 16)
    server.kill(signal.SIGTERM)
    time.sleep(1.0)
    server.restart()
    out, err = follower.communicate(timeout=60)
    assert head + out == b"".join(b"%d\n" % i for i in range(60))
    # logs exits 0, run with the job's status; the job's stderr, after ours, at its end.
    assert follower.returncode == (0 if command == "logs" else 7), err
    assert b"the server went away; resuming at offset" in err
    assert err.endswith(b"end\n")


UNIFIED = Path("/sys/fs/cgroup/unified")


@pytest.fixture
def cgroup_root() -> Iterator[Path]:
    """A fresh cgroup root under the hybrid host's cgroup2 mount, removed afterwards."""
    if not (UNIFIED / "cgroup.kill").exists() and not UNIFIED.is_dir():
        pytest.skip(f"{UNIFIED} is not a cgroup2 mount")
    root = UNIFIED / f"jw-live-{os.getpid()}-{time.monotonic_ns()}"
    yield root
    if root.exists():
        for child in root.iterdir():
            if child.is_dir():
                (child / "cgroup.kill").write_text("1")
                procs = child / "cgroup.procs"
                _wait_until(lambda procs=procs: not procs.read_text().strip())  # type: ignore[misc]
                child.rmdir()
        root.rmdir()


def test_a_job_in_its_cgroup_is_adopted_and_stopped_whole(
    live: Callable[..., LiveServer], cgroup_root: Path
) -> None:
    server = live("--no-isolation", "--plugin=cgroupv2", f"--cgroup-root={cgroup_root}")
    # The second sleep leaves the job's session: only the cgroup still holds it.
    job = server.start("sh", "-c", "setsid sleep 1000 & echo $!; exec sleep 1000")
    escaped = int(next(iter(server.output(job))).data)
    before = server.status(job)
    assert before.containment == f"cgroupv2:{cgroup_root / job}"
    stray = cgroup_root / "not-a-job"
    foreign = cgroup_root / "not-ours"
    server.kill(signal.SIGTERM)  # the plugin's shutdown leaves the job's cgroup
    assert _alive(escaped) and (cgroup_root / job).is_dir()
    stray.mkdir()
    assert mark_ours(stray)  # as if the killed server had made it: a leftover of its own
    foreign.mkdir()  # made by someone else: never the server's to remove
    server.restart()
    after = server.status(job)
    assert (after.status, after.containment, after.pid) == (
        "running",
        before.containment,
        before.pid,
    )
    assert not stray.exists(), "a cgroup no record names survived the restart"
    assert foreign.exists(), "a cgroup no server of this root made was removed"
    server.stub.StopJob(pb.JobRequest(job_id=job, grace_seconds=1), timeout=RPC_TIMEOUT_S)
    assert server.status(job).reason == "stopped"
    _wait_until(lambda: not _alive(escaped))


def test_a_tampered_record_kills_what_its_cgroup_holds(
    live: Callable[..., LiveServer], cgroup_root: Path
) -> None:
    server = live("--no-isolation", "--plugin=cgroupv2", f"--cgroup-root={cgroup_root}")
    job = server.start("sleep", "1000")
    real = server.status(job).pid
    server.kill()
    victim = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    try:
        record = server.spool / "live" / f"{job}.job"
        data = json.loads(record.read_text())
        _rewrite(record, process={**data["process"], "pid": victim.pid})
        server.restart()
        assert server.wait(job).reason == "lost"
        assert victim.poll() is None
        _wait_until(lambda: not _alive(real))
    finally:
        victim.kill()
        victim.wait()


def test_the_stdin_of_an_interactive_job_is_open_again_after_a_restart(
    live: Callable[..., LiveServer], pki: Pki
) -> None:
    server = live("--no-isolation")
    job = server.stub.StartJob(
        pb.StartJobRequest(command="cat", stdin=True), timeout=RPC_TIMEOUT_S
    ).job_id
    env = pki.client_env("alice", server.address)

    def write(data: bytes, *flags: str) -> None:
        done = subprocess.run(
            [JOBWORKER, "write", job, *flags], input=data, env=env, capture_output=True, timeout=60
        )
        assert done.returncode == 0, done.stderr

    write(b"before\n", "--keep-open")
    next(iter(server.output(job)))  # cat has copied it: the server is no longer needed
    server.kill()
    time.sleep(0.5)  # were stdin closed, cat would end now
    server.restart()
    assert server.status(job).status == "running", "cat read end-of-file while no server ran"
    write(b"after\n")
    status = server.wait(job)
    assert (status.reason, status.exit_code) == ("exited", 0)
    assert b"".join(c.data for c in server.output(job)) == b"before\nafter\n"


#: The first version with live restore (its records and its ingest process's hand-over are
#: what a newer server must still take over).
UPGRADE_FROM = "1c2d5f3"


@pytest.fixture
def older_version(tmp_path: Path) -> Path:
    """The source of :data:`UPGRADE_FROM`, extracted apart: its server runs with this
    interpreter and dependencies, its own jobworker first on the path."""
    repo = Path(__file__).resolve().parents[2]
    target = tmp_path / f"jobworker-{UPGRADE_FROM}"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", UPGRADE_FROM], capture_output=True, check=False
    )
    if archive.returncode != 0:
        pytest.skip(f"no git history with {UPGRADE_FROM}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def test_an_upgrade_adopts_the_jobs_of_the_older_version(
    live: Callable[..., LiveServer], older_version: Path, tmp_path: Path
) -> None:
    server = live("--no-isolation")
    server.kill(signal.SIGTERM)  # this version's server only made the spool: the old one runs
    log_path = tmp_path / "older.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jobworker", "serve", *server.args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Not this checkout's directory: `-m` puts the working directory first on the path.
            cwd=older_version,
            env=clean_env(PYTHONPATH=str(older_version), JOBWORKER_HOME=str(tmp_path / "h")),
        )
    older = Server(process=process, address=server.address, log_path=log_path)
    try:
        older.wait_ready()
        ends = server.start("sh", "-c", "echo a; sleep 2; echo b; exit 5")
        runs = server.start("sleep", "1000")
        assert _ingest_processes_of(older_version), "the older version's ingest is not running"
    finally:
        assert older.terminate() == 0
    server.restart()
    assert server.status(runs).status == "running"
    status = server.wait(ends)
    assert (status.reason, status.exit_code) == ("exited", 5)
    assert b"".join(c.data for c in server.output(ends)) == b"a\nb\n"
    server.stub.StopJob(pb.JobRequest(job_id=runs, grace_seconds=0), timeout=RPC_TIMEOUT_S)
    assert server.status(runs).reason == "stopped"
    assert not server.events("ingest_process_gone")
    _wait_until(lambda: not _ingest_processes_of(older_version))  # it handed over and left


def _ingest_processes_of(source: Path, parent: int | None = None) -> list[int]:
    """The ingest processes running ``source``'s code (children of ``parent``, if given)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError, PermissionError):
            continue
        ours = b"jobworker-ingest" in argv and str(source).encode() in argv
        if ours and parent in (None, ppid):
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_follower_gets_unavailable_when_the_server_goes(
    live: Callable[..., LiveServer], signum: int
) -> None:
    server = live("--no-isolation")
    job = server.start("sh", "-c", "echo first; exec sleep 1000")
    chunks = server.output(job)
    assert next(chunks).data == b"first\n"
    server.kill(signum)
    with pytest.raises(grpc.RpcError) as ended:
        next(chunks)
    assert ended.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_job_whose_spool_is_gone_is_lost_and_killed(live: Callable[..., LiveServer]) -> None:
    server = live("--no-isolation")
    job = server.start("sh", "-c", "echo started; exec sleep 1000")
    next(iter(server.output(job)))
    pid = server.status(job).pid
    server.kill()
    (server.spool / LIVE_RUN / f"{job}.out").unlink()
    server.restart()
    _wait_until(lambda: server.status(job).status == "exited")
    status = server.status(job)
    assert (status.reason, status.output_truncated) == ("lost", True)
    [refusal] = server.events("job_not_adopted")
    assert "its spool is gone" in str(refusal["reason"])
    _wait_until(lambda: not _alive(pid))
    with pytest.raises(grpc.RpcError) as cut:
        server.wait(job)
    assert cut.value.code() is grpc.StatusCode.DATA_LOSS
    assert "the loss of its spool file while no server ran" in str(cut.value.details())

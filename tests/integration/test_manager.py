"""The job engine with real processes: start, output, followers, stop, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest

from jobworker import hookimpl
from jobworker.backends.local import ending
from jobworker.backends.local.containment import ContainmentReport, ProcessGroup
from jobworker.backends.local.manager import JobManager
from jobworker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SpawnError,
)
from jobworker.hooks.host import Plugins
from jobworker.jobspec import MAX_ARGS, MAX_COMMAND_BYTES, MAX_ENV, MAX_SPEC_BYTES, JobSpec
from jobworker.model import (
    ExitInfo,
    JobState,
    JobStatus,
    ResourceUsage,
    Stream,
    TerminationReason,
    describe_end,
)

T = TypeVar("T")


def run_with_manager(
    tmp_path: Path,
    body: Callable[[JobManager], Awaitable[T]],
    plugins: Plugins | None = None,
    **kw: Any,
) -> T:
    """Run ``body`` against a fresh manager and always shut it down."""

    async def main() -> T:
        manager = JobManager(plugins or Plugins(), tmp_path, **kw)
        try:
            return await body(manager)
        finally:
            await manager.shutdown()
            assert list(tmp_path.iterdir()) == [], "shutdown left spool files behind"

    return asyncio.run(asyncio.wait_for(main(), 240))


async def collect(manager: JobManager, job_id: str, offset: int = 0) -> list[tuple[Stream, bytes]]:
    return [(c.stream, c.data) async for c in manager.follow(job_id, offset)]


def sh(script: str, **kw: Any) -> JobSpec:
    return JobSpec("sh", ("-c", script), **kw)


def gone(pid: int) -> bool:
    """True once ``pid`` is dead: absent, or a zombie its new parent has yet to reap."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


def test_exit_code_and_tagged_output_in_order(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        job = await m.start(sh("printf a; printf b >&2; sleep 0.05; printf c; exit 3"), "alice")
        assert job.state is JobState.RUNNING and job.owner == "alice"
        chunks = await collect(m, job.job_id)
        status = m.get(job.job_id)
        assert chunks == [(Stream.STDOUT, b"a"), (Stream.STDERR, b"b"), (Stream.STDOUT, b"c")]
        assert status.state is JobState.EXITED
        assert status.exit is not None and status.exit.reason is TerminationReason.EXITED
        assert status.exit.exit_code == 3 and status.exit.signal is None
        assert status.ended_at is not None and status.ended_at >= status.started_at

    run_with_manager(tmp_path, body)


def test_environment_is_exactly_what_was_asked(tmp_path: Path) -> None:
    os.environ["JOBWORKER_TEST_LEAK"] = "server-secret"

    async def body(m: JobManager) -> bytes:
        job = await m.start(JobSpec("env", env={"ONLY": "this"}, cwd="/"), "a")
        return b"".join(d for _, d in await collect(m, job.job_id))

    out = run_with_manager(tmp_path, body).decode().splitlines()
    assert sorted(out) == sorted(["ONLY=this", f"PATH={JobSpec('x').job_env()['PATH']}"])


def test_job_gets_its_own_session_devnull_stdin_and_no_inherited_fds(tmp_path: Path) -> None:
    leaked = os.open("/dev/null", os.O_RDONLY)  # an inheritable descriptor in the server
    os.set_inheritable(leaked, True)
    script = (
        "ps -o sid= -p $$; ps -o pgid= -p $$; echo $$; ls /proc/self/fd; readlink /proc/self/fd/0"
    )

    async def body(m: JobManager) -> list[str]:
        job = await m.start(sh(script), "a")
        return b"".join(d for _, d in await collect(m, job.job_id)).decode().split()

    try:
        sid, pgid, pid, *fds, stdin = run_with_manager(tmp_path, body)
    finally:
        os.close(leaked)
    assert sid == pgid == pid
    assert stdin == "/dev/null"
    assert sorted(fds) == ["0", "1", "2", "3"]  # 3 is the directory ls reads


def test_missing_command_bad_cwd_not_executable_leave_nothing(tmp_path: Path) -> None:
    script = tmp_path.parent / "not-executable.sh"
    script.write_text("echo hi\n")

    async def body(m: JobManager) -> None:
        with pytest.raises(SpawnError, match="No such file or directory"):
            await m.start(JobSpec("/no/such/program"), "a")
        with pytest.raises(SpawnError, match="working directory '/no/such/dir'"):
            await m.start(JobSpec("true", cwd="/no/such/dir"), "a")
        with pytest.raises(SpawnError, match="Permission denied"):
            await m.start(JobSpec(str(script)), "a")
        assert m.list() == []
        assert list(tmp_path.iterdir()) == []

    run_with_manager(tmp_path, body)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"command": ""}, "command is empty"),
        ({"command": "echo", "args": ("a\0b",)}, "NUL"),
        ({"command": "echo", "env": {"A=B": "c"}}, "contains '='"),
        ({"command": "echo", "cwd": "relative"}, "absolute"),
        ({"command": "echo", "args": tuple("x" * 1025)}, "at most 1024"),
    ],
)
def test_bad_specs_are_rejected(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    """A spec the launcher could not run cannot be built, so no manager ever sees one; one
    that a plugin turns bad (``pre_spawn``) is refused the same way, leaving nothing."""

    class Spoil:
        @hookimpl
        def jobworker_pre_spawn(self, spec: JobSpec) -> JobSpec:
            return attrs.evolve(spec, **fields)

    with pytest.raises(InvalidArgument, match=message):
        JobSpec(**fields)
    plugins = Plugins()
    plugins.register(Spoil(), "spoil")

    async def body(m: JobManager) -> None:
        with pytest.raises(InvalidArgument, match=message):
            await m.start(JobSpec("true"), "a")
        assert m.list() == []

    run_with_manager(tmp_path, body, plugins=plugins)


def test_hundred_concurrent_jobs(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        jobs = await asyncio.gather(
            *(m.start(sh(f"echo job-{i}; exit {i % 7}"), "a") for i in range(100))
        )
        assert len({j.job_id for j in jobs}) == 100
        outputs = await asyncio.gather(*(collect(m, j.job_id) for j in jobs))
        for i, (job, out) in enumerate(zip(jobs, outputs, strict=True)):
            assert out == [(Stream.STDOUT, f"job-{i}\n".encode())]
            final = await m.wait(job.job_id)
            assert final.exit is not None and final.exit.exit_code == i % 7

    run_with_manager(tmp_path, body)


def test_gigabyte_to_ten_followers_and_a_late_one(tmp_path: Path) -> None:
    """Every follower gets the job's exact bytes, including one that joins after the end."""
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = tmp_path / "written.bin"
    size = 1 << 30

    async def follower(m: JobManager, job_id: str) -> tuple[int, str]:
        digest = hashlib.sha256()
        n = 0
        async for chunk in m.follow(job_id):
            assert chunk.stream is Stream.STDOUT
            digest.update(chunk.data)
            n += len(chunk.data)
        return n, digest.hexdigest()

    async def body(m: JobManager) -> None:
        job = await m.start(sh(f"openssl rand {size} | tee {copy}"), "a")
        live = await asyncio.gather(*(follower(m, job.job_id) for _ in range(10)))
        late = await follower(m, job.job_id)
        expected = hashlib.sha256(copy.read_bytes()).hexdigest()
        assert set(live) | {late} == {(size, expected)}

    run_with_manager(spool, body)


def test_stuck_follower_does_not_stall_the_job(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        job = await m.start(sh("head -c 200000000 /dev/zero"), "a")
        stuck = m.follow(job.job_id)
        first = await anext(stuck)  # reads one chunk, then never again
        assert first.data
        final = await asyncio.wait_for(m.wait(job.job_id), 60)
        assert final.exit is not None and final.exit.exit_code == 0
        assert final.output_bytes == 200_000_000
        await stuck.aclose()

    run_with_manager(tmp_path, body)


def test_resume_from_offset_and_no_follow(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        job = await m.start(sh("echo one; sleep 0.1; echo two >&2; sleep 30"), "a")
        first = await anext(m.follow(job.job_id))
        assert first.data == b"one\n"
        await asyncio.sleep(0.5)
        now = [c async for c in m.follow(job.job_id, offset=first.offset, follow=False)]
        assert [(c.stream, c.data) for c in now] == [(Stream.STDERR, b"two\n")]
        with pytest.raises(InvalidArgument, match="not a chunk boundary"):
            m.follow(job.job_id, offset=first.offset - 1)
        with pytest.raises(InvalidArgument, match="beyond"):
            m.follow(job.job_id, offset=10**9)
        await m.stop(job.job_id, by="test", grace=1)

    run_with_manager(tmp_path, body)


def test_stop_escalates_when_sigterm_is_ignored(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        job = await m.start(sh("trap '' TERM; echo ready; while :; do sleep 0.1; done"), "a")
        await anext(m.follow(job.job_id))  # the trap is set
        started = time.monotonic()
        result = await m.stop(job.job_id, by="bob", grace=0.5)
        assert 0.5 <= time.monotonic() - started < 5
        assert result.escalated and result.already_finished is False
        ex = result.status.exit
        assert ex is not None and ex.reason is TerminationReason.STOPPED
        assert ex.stopped_by == "bob" and ex.escalated and ex.signal == signal.SIGKILL

    run_with_manager(tmp_path, body)


def test_stop_graceful_and_whole_group(tmp_path: Path) -> None:
    """SIGTERM reaches every process of the group, not only the leader."""

    async def body(m: JobManager) -> None:
        job = await m.start(sh("sleep 100 & sleep 100 & echo $!; wait"), "a")
        child = int((await anext(m.follow(job.job_id))).data)
        result = await m.stop(job.job_id, by="bob", grace=5)
        assert not result.escalated
        assert result.status.exit is not None and result.status.exit.signal == signal.SIGTERM
        assert gone(child)

    run_with_manager(tmp_path, body)


def test_stop_finished_job_and_concurrent_stops(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        done = await m.start(JobSpec("true"), "a")
        await m.wait(done.job_id)
        again = await m.stop(done.job_id, by="bob")
        assert (
            again.already_finished and "already finished (exited with exit code 0)" in again.message
        )
        assert again.escalated is False
        job = await m.start(JobSpec("sleep", ("100",)), "a")
        results = await asyncio.gather(
            *(m.stop(job.job_id, by=f"u{i}", grace=2) for i in range(20))
        )
        assert {r.status.exit.stopped_by for r in results if r.status.exit} == {"u0"}
        with pytest.raises(NotFound):
            await m.stop("no-such-job", by="bob")

    run_with_manager(tmp_path, body)


def test_main_exit_kills_leftover_group_members(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        job = await m.start(sh("sleep 100 & echo $!"), "a")
        out = await collect(m, job.job_id)
        assert gone(int(out[0][1]))

    run_with_manager(tmp_path, body)


def test_shutdown_stops_everything(tmp_path: Path) -> None:
    pids: list[int] = []

    async def body(m: JobManager) -> None:
        for _ in range(5):
            job = await m.start(sh("trap '' TERM; sleep 100"), "a")
            pids.append(job.pid)
        await m.shutdown(grace=0.2)
        assert m.list() == []

    run_with_manager(tmp_path, body)
    assert all(gone(pid) for pid in pids)


def test_retention_evicts_oldest_finished(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        ids = []
        for _ in range(5):
            job = await m.start(JobSpec("true"), "a")
            await m.wait(job.job_id)
            ids.append(job.job_id)
        assert [j.job_id for j in m.list()] == ids[-2:]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.out" for i in ids[-2:])
        with pytest.raises(NotFound):
            m.get(ids[0])

    run_with_manager(tmp_path, body, retain_finished=2)


def test_retention_evicts_finished_jobs_by_age(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        old = await m.start(JobSpec("true"), "a")
        await m.wait(old.job_id)
        assert [j.job_id for j in m.list()] == [old.job_id]  # young enough: kept
        await asyncio.sleep(1.2)
        running = await m.start(JobSpec("sleep", ("30",)), "a")
        young = await m.start(JobSpec("true"), "a")
        await m.wait(young.job_id)
        # The old job is past retain_seconds; a running job is never evicted, however old.
        assert sorted(j.job_id for j in m.list()) == sorted([running.job_id, young.job_id])
        assert not (tmp_path / f"{old.job_id}.out").exists()
        with pytest.raises(NotFound):
            m.get(old.job_id)
        await asyncio.sleep(1.2)
        assert [j.job_id for j in m.list()] == [running.job_id]
        await m.stop(running.job_id, by="test", grace=1)

    run_with_manager(tmp_path, body, retain_seconds=1.0)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR1], ids=lambda s: s.name)
def test_job_killed_by_a_signal_has_no_exit_code(tmp_path: Path, sig: signal.Signals) -> None:
    """The model says None (the wire says 128+N); never 0, which would read as success."""

    async def body(m: JobManager) -> None:
        job = await m.start(sh(f"kill -{sig.name[3:]} $$; exit 7"), "a")
        final = await m.wait(job.job_id)
        assert final.exit is not None
        assert (final.exit.reason, final.exit.exit_code, final.exit.signal) == (
            TerminationReason.SIGNALED,
            None,
            sig,
        )
        assert final.exit.stopped_by is None and not final.exit.escalated

    run_with_manager(tmp_path, body)


class Veto:
    @hookimpl
    def jobworker_pre_spawn(self, spec: JobSpec) -> None:
        if spec.command == "touch":
            raise PermissionDenied("touch is not allowed here")


class Boom:
    @hookimpl
    def jobworker_output_chunk(self, data: bytes) -> None:
        raise RuntimeError("observer bug")


class Recorder:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    @hookimpl
    def jobworker_output_chunk(self, data: bytes) -> None:
        self.data.append(data)


def test_pre_spawn_veto_and_crashing_observer(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    vetoed = tmp_path / "vetoed"  # what the vetoed job would create: harmless if it ran
    plugins = Plugins()
    recorder = Recorder()
    plugins.register(Veto(), "veto")
    plugins.register(Boom(), "boom")
    plugins.register(recorder, "recorder")

    async def body(m: JobManager) -> None:
        with pytest.raises(PermissionDenied, match="touch is not allowed"):
            await m.start(JobSpec("touch", (str(vetoed),)), "a")
        assert m.list() == []
        job = await m.start(JobSpec("echo", ("fine",)), "a")
        assert await collect(m, job.job_id) == [(Stream.STDOUT, b"fine\n")]
        final = await m.wait(job.job_id)
        assert final.exit is not None and final.exit.exit_code == 0

    run_with_manager(spool, body, plugins=plugins)
    assert recorder.data == [b"fine\n"]
    assert not vetoed.exists()


def test_finished_job_holds_no_descriptor_and_still_streams(tmp_path: Path) -> None:
    def spool_fds() -> list[str]:
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:
                pass
        return [t for t in targets if t.startswith(str(tmp_path))]

    async def body(m: JobManager) -> None:
        job = await m.start(sh("echo kept"), "a")
        await m.wait(job.job_id)
        assert spool_fds() == []
        assert await collect(m, job.job_id) == [(Stream.STDOUT, b"kept\n")]
        assert spool_fds() == []

    run_with_manager(tmp_path, body)


def test_containment_is_released_off_the_event_loop(tmp_path: Path) -> None:
    """Removing a cgroup may wait for the kernel (EBUSY): never on the event loop's thread."""
    released_on: list[threading.Thread] = []

    class Recording(ProcessGroup):
        def release(self) -> None:
            released_on.append(threading.current_thread())
            super().release()

    class Contain:
        @hookimpl
        def jobworker_limits_apply(self) -> Recording:
            return Recording()

    plugins = Plugins()
    plugins.register(Contain(), "contain")

    async def body(m: JobManager) -> None:
        job = await m.start(JobSpec("true"), "a")
        await m.wait(job.job_id)
        with pytest.raises(SpawnError):  # a failed start releases too
            await m.start(JobSpec("/no/such/program"), "a")

    run_with_manager(tmp_path, body, plugins=plugins)
    assert len(released_on) == 2
    assert threading.main_thread() not in released_on


def test_stop_wakes_a_job_stopped_by_sigstop(tmp_path: Path) -> None:
    """A stopped process cannot act on SIGTERM: the stop sends SIGCONT too, so no SIGKILL."""

    async def body(m: JobManager) -> None:
        job = await m.start(sh("echo stopping; kill -STOP $$; sleep 100"), "a")
        await anext(m.follow(job.job_id))
        deadline = time.monotonic() + 5
        while Path(f"/proc/{job.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline, "the job never stopped itself"
            await asyncio.sleep(0.01)
        result = await m.stop(job.job_id, by="bob", grace=10)
        ex = result.status.exit
        assert not result.escalated and ex is not None
        assert (ex.reason, ex.signal, ex.escalated) == (
            TerminationReason.STOPPED,
            signal.SIGTERM,
            False,
        )
        assert result.message == "stopped by bob (signal 15)"

    run_with_manager(tmp_path, body)


def test_grace_bounds_and_zero_grace(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        job = await m.start(JobSpec("sleep", ("100",)), "a")
        for grace in (-0.001, 3600.001):
            with pytest.raises(InvalidArgument, match=f"grace {grace} must be between 0 and 3600"):
                await m.stop(job.job_id, by="bob", grace=grace)
        assert m.get(job.job_id).state is JobState.RUNNING
        await m.stop(job.job_id, by="bob", grace=1)
        deaf = await m.start(sh("trap '' TERM; echo ready; while :; do sleep 0.1; done"), "a")
        await anext(m.follow(deaf.job_id))  # the trap is set
        started = time.monotonic()
        result = await m.stop(deaf.job_id, by="bob", grace=0)  # no grace: SIGKILL at once
        assert time.monotonic() - started < 2
        assert result.escalated and result.status.exit is not None
        assert result.status.exit.signal == signal.SIGKILL
        assert result.message == "stopped by bob (signal 9, SIGKILL after the grace period)"
        last = await m.start(JobSpec("sleep", ("100",)), "a")
        assert not (await m.stop(last.job_id, by="bob", grace=3600)).escalated

    run_with_manager(tmp_path, body)


def test_default_grace_applies_when_none_is_given(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        job = await m.start(sh("trap '' TERM; echo ready; while :; do sleep 0.1; done"), "a")
        await anext(m.follow(job.job_id))
        started = time.monotonic()
        result = await m.stop(job.job_id, by="bob")
        assert 0.3 <= time.monotonic() - started < 5 and result.escalated

    run_with_manager(tmp_path, body, default_grace=0.3)


def test_running_jobs_are_bounded(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        first = await m.start(JobSpec("sleep", ("100",)), "a")
        second = await m.start(JobSpec("sleep", ("100",)), "a")
        with pytest.raises(
            ResourceExhausted, match=r"2 jobs are running, the most this server allows \(2\)"
        ):
            await m.start(JobSpec("true"), "a")
        assert m.running == 2
        await m.stop(first.job_id, by="a", grace=1)
        assert m.running == 1  # a finished job does not count
        third = await m.start(JobSpec("true"), "a")
        await m.wait(third.job_id)
        await m.stop(second.job_id, by="a", grace=1)

    run_with_manager(tmp_path, body, max_running=2)


def test_no_start_once_shutting_down(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        await m.shutdown()
        with pytest.raises(FailedPrecondition, match="shutting down"):
            await m.start(JobSpec("true"), "a")

    run_with_manager(tmp_path, body)


@pytest.mark.parametrize(
    ("exit", "phrase"),
    [
        (ExitInfo(TerminationReason.EXITED, exit_code=3), "exited with exit code 3"),
        (ExitInfo(TerminationReason.SIGNALED, signal=11), "killed by signal 11"),
        (ExitInfo(TerminationReason.OOM_KILLED, signal=9), "killed by the OOM killer (signal 9)"),
        (
            ExitInfo(TerminationReason.STOPPED, signal=15, stopped_by="bob"),
            "stopped by bob (signal 15)",
        ),
        (
            ExitInfo(TerminationReason.STOPPED, exit_code=0, stopped_by="bob"),
            "stopped by bob (exit code 0)",
        ),
        (
            ExitInfo(TerminationReason.STOPPED, signal=9, stopped_by="bob", escalated=True),
            "stopped by bob (signal 9, SIGKILL after the grace period)",
        ),
        (None, "running"),
    ],
)
def test_describe_end(exit: ExitInfo | None, phrase: str) -> None:
    status = JobStatus("id", JobSpec("x"), "a", JobState.EXITED, 1, 0.0, "process-group", exit=exit)
    assert describe_end(status) == phrase


QUARTER = MAX_SPEC_BYTES // 4  # each under MAX_ARG_STRLEN, so only the total can be over


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({"command": "x" * MAX_COMMAND_BYTES}, None),
        ({"command": "x" * (MAX_COMMAND_BYTES + 1)}, f"longer than {MAX_COMMAND_BYTES} bytes"),
        ({"command": "é" * (MAX_COMMAND_BYTES // 2) + "x"}, "longer than"),  # bytes, not chars
        ({"args": ("a",) * MAX_ARGS}, None),
        ({"env": {f"V{i}": "" for i in range(MAX_ENV)}}, None),
        ({"env": {f"V{i}": "" for i in range(MAX_ENV + 1)}}, "1025 environment variables"),
        ({"args": ("a" * QUARTER,) * 4}, None),
        ({"args": ("a" * QUARTER,) * 4 + ("b",)}, f"take {MAX_SPEC_BYTES + 1} bytes"),
        ({"env": {f"K{i}": "v" * (QUARTER - 2) for i in range(4)}}, None),
        (
            {"env": {f"K{i}": "v" * (QUARTER - 1) for i in range(4)}},
            f"take {MAX_SPEC_BYTES + 4} bytes",
        ),
        ({"env": {"A": "b\0c"}}, "environment contains a NUL byte"),
        ({"cwd": "/a\0b"}, "cwd contains a NUL byte"),
        ({"command": "x\0"}, "command contains a NUL byte"),
        ({"env": {"": "v"}}, "name '' is empty"),
        ({"cwd": "/"}, None),
    ],
)
def test_spec_limits_are_exact(fields: dict[str, Any], refused: str | None) -> None:
    """The model refuses a spec the launcher could not run when it is built."""
    fields = {"command": "x", **fields}
    if refused is None:
        JobSpec(**fields)
    else:
        with pytest.raises(InvalidArgument, match=refused):
            JobSpec(**fields)


class ReportingContainment(ProcessGroup):
    """A process group that reports what a cgroup would: an OOM kill and its accounting."""

    def report(self) -> ContainmentReport:
        return ContainmentReport(oom_killed=True, usage=ResourceUsage(memory_peak_bytes=4096))


class LingeringContainment(ProcessGroup):
    """A process group with a process that never goes (stuck in uninterruptible IO)."""

    async def wait_empty(self) -> None:
        await asyncio.Event().wait()


class ContainAndObserve:
    def __init__(self, containment: type[ProcessGroup]) -> None:
        self.containment = containment
        self.exits: list[JobStatus] = []

    @hookimpl
    def jobworker_limits_apply(self) -> ProcessGroup:
        return self.containment()

    @hookimpl
    def jobworker_on_exit(self, status: JobStatus) -> None:
        self.exits.append(status)


def test_containment_report_and_on_exit(tmp_path: Path) -> None:
    plugins = Plugins()
    plugin = ContainAndObserve(ReportingContainment)
    plugins.register(plugin, "containment")

    async def body(m: JobManager) -> JobStatus:
        job = await m.start(sh("kill -KILL $$"), "a")
        return await m.wait(job.job_id)

    final = run_with_manager(tmp_path, body, plugins=plugins)
    assert final.exit is not None
    assert (final.exit.reason, final.exit.signal) == (TerminationReason.OOM_KILLED, signal.SIGKILL)
    assert final.usage == ResourceUsage(memory_peak_bytes=4096)
    assert plugin.exits == [final]  # plugins hear of the end once, with the final status


def test_job_ends_although_a_process_never_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ending, "SETTLE_TIMEOUT", 0.5)
    plugins = Plugins()
    plugins.register(ContainAndObserve(LingeringContainment), "containment")

    async def body(m: JobManager) -> None:
        job = await m.start(sh("exit 4"), "a")
        final = await asyncio.wait_for(m.wait(job.job_id), 10)
        assert final.exit is not None and final.exit.exit_code == 4

    run_with_manager(tmp_path, body, plugins=plugins)


def test_job_ends_although_an_escaped_process_holds_its_output(tmp_path: Path) -> None:
    """A process that left the group (setsid) keeps the pipe open: the server closes it."""
    escaped: list[int] = []

    async def body(m: JobManager) -> None:
        # The pid is printed once that process has left the job's group (see
        # test_ingest_process's shutdown test): the job cannot take it with it by ending first.
        job = await m.start(
            sh("exec 3>&1; pid=$(setsid sh -c 'echo $$; exec sleep 60 1>&3' &); echo $pid"), "a"
        )
        first = await anext(m.follow(job.job_id))
        escaped.append(int(first.data))
        started = time.monotonic()
        final = await asyncio.wait_for(m.wait(job.job_id), 20)
        assert time.monotonic() - started < 2 + ending.PIPE_DRAIN_TIMEOUT
        assert final.exit is not None and final.exit.exit_code == 0
        assert final.output_bytes == len(first.data)

    try:
        run_with_manager(tmp_path, body)
    finally:
        for pid in escaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_shutdown_stops_with_its_own_grace_and_says_who(tmp_path: Path) -> None:
    plugins = Plugins()
    observer = ContainAndObserve(ProcessGroup)
    plugins.register(observer, "observer")

    async def body(m: JobManager) -> None:
        job = await m.start(sh("trap '' TERM; echo ready; while :; do sleep 0.1; done"), "a")
        await anext(m.follow(job.job_id))
        started = time.monotonic()
        await m.shutdown(grace=0.2)
        assert time.monotonic() - started < 5  # not the default grace of 30 s

    run_with_manager(tmp_path, body, plugins=plugins, default_grace=30)
    [final] = observer.exits
    assert final.exit is not None
    assert (final.exit.stopped_by, final.exit.escalated) == ("server-shutdown", True)

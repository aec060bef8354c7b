"""Plugins that misbehave, and the audit-log plugin, against real processes.

A raising observer is logged with its name and changes nothing else; a raising gate denies
with its message; a plugin that cannot be imported stops ``jobworker serve`` before it
listens. The audit log records what happened, follows rotation, and never stops a job when
its disk fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from jobworker import hookimpl
from jobworker.api.identity import Identity
from jobworker.api.pki import PkiPaths
from jobworker.backends.local.manager import JobManager
from jobworker.errors import ConfigError, PermissionDenied, SpawnError
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.model import Action, JobStatus, Stream
from jobworker.plugins.auditlog import AuditLog
from jobworker.v1 import jobworker_pb2 as pb
from tests.integration.test_manager import collect, run_with_manager, sh
from tests.serverfixtures import (
    NOT_WHITELISTED,
    RPC_TIMEOUT_S,
    authz_plugins,
    running_server,
    start_job,
    wait_exited,
)

ALICE = Identity(common_name="alice")


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- observers and gates ------------------------------------------------------------------


class Broken:
    """Raises in every observer hook it has."""

    @hookimpl
    def jobworker_job_started(self, status: JobStatus) -> None:
        raise RuntimeError("started bug")

    @hookimpl
    def jobworker_output_chunk(self, data: bytes) -> None:
        raise RuntimeError("chunk bug")

    @hookimpl
    def jobworker_on_exit(self, status: JobStatus) -> None:
        raise RuntimeError("exit bug")

    @hookimpl
    def jobworker_decision(self, allowed: bool) -> None:
        raise RuntimeError("decision bug")


class Witness:
    """Registered before and after the broken plugin: pluggy calls the last one first."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def jobworker_job_started(self, status: JobStatus) -> None:
        self.seen.append("started")

    @hookimpl
    def jobworker_output_chunk(self, data: bytes) -> None:
        self.seen.append(f"chunk:{data.decode().strip()}")

    @hookimpl
    def jobworker_on_exit(self, status: JobStatus) -> None:
        self.seen.append("exit")

    @hookimpl
    def jobworker_decision(self, allowed: bool) -> None:
        self.seen.append(f"decision:{allowed}")


def test_raising_observer_is_logged_by_name_and_breaks_nothing(tmp_path: Path) -> None:
    before, after = Witness(), Witness()
    plugins = Plugins()
    plugins.register(before, "before")
    plugins.register(Broken(), "broken")
    plugins.register(after, "after")

    async def body(m: JobManager) -> JobStatus:
        job = await m.start(sh("echo out; echo err >&2; exit 4"), "alice")
        output = await collect(m, job.job_id)
        assert sorted(output) == [(Stream.STDOUT, b"out\n"), (Stream.STDERR, b"err\n")]
        plugins.decision(ALICE, Action.STATUS, job.job_id, True, "allowed")
        return await m.wait(job.job_id)

    with structlog.testing.capture_logs() as logs:
        final = run_with_manager(tmp_path, body, plugins=plugins)

    assert final.exit is not None and final.exit.exit_code == 4
    expected = ["started", "chunk:out", "chunk:err", "exit", "decision:True"]
    for witness in (before, after):
        assert sorted(witness.seen) == sorted(expected)
    failures = {(e["plugin"], e["hook"]) for e in logs if e["event"] == "plugin_hook_failed"}
    assert failures == {
        ("broken", "jobworker_job_started"),
        ("broken", "jobworker_output_chunk"),
        ("broken", "jobworker_on_exit"),
        ("broken", "jobworker_decision"),
    }
    assert all(e["log_level"] == "error" for e in logs if e["event"] == "plugin_hook_failed")


class Quota:
    @hookimpl
    def jobworker_pre_spawn(self, spec: JobSpec) -> None:
        if spec.command == "make":
            raise RuntimeError("quota exceeded for make")


class Grumpy:
    @hookimpl
    def jobworker_authorize(self, identity: Identity) -> None:
        raise KeyError("no such tenant")


def test_raising_gate_denies_with_its_message(tmp_path: Path) -> None:
    plugins = Plugins()
    plugins.register(Quota(), "quota")
    plugins.register(Grumpy(), "grumpy")

    async def body(m: JobManager) -> None:
        with pytest.raises(PermissionDenied, match="denied by plugin 'quota': quota exceeded"):
            await m.start(JobSpec("make"), "alice")
        assert m.list() == []
        job = await m.start(JobSpec("true"), "alice")  # the gate let this one through
        await m.wait(job.job_id)

    run_with_manager(tmp_path, body, plugins=plugins)
    with pytest.raises(PermissionDenied, match="denied by plugin 'grumpy': 'no such tenant'"):
        plugins.authorize(ALICE, Action.START, None)


# -- a plugin that cannot be loaded stops start-up ----------------------------------------


@pytest.fixture
def broken_distribution(tmp_path: Path) -> Path:
    """An installed-looking distribution with one plugin that fails to import, one typo."""
    site = tmp_path / "site"
    dist = site / "jw_broken-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jw-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[jobworker]\nbroken = jw_broken\ntypo = jw_typo\n")
    (site / "jw_broken.py").write_text("raise ImportError('needs libfoo 2.0')\n")
    (site / "jw_typo.py").write_text(
        "from jobworker import hookimpl\n@hookimpl\ndef jobworker_on_exitt(status): pass\n"
    )
    return site


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("broken", "plugin 'broken' failed to load: ImportError: needs libfoo 2.0"),
        pytest.param(
            "typo",
            "plugin 'typo'.*jobworker_on_exitt",
        ),
        (
            "no-such",
            "unknown plugin 'no-such': neither built in nor installed.*available: authz, audit-log",
        ),
    ],
)
def test_plugin_that_fails_to_load_stops_serve(
    broken_distribution: Path, api_pki: PkiPaths, name: str, message: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(broken_distribution)}
    server = api_pki.server()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "jobworker", "serve", "--listen", "127.0.0.1:0"),
            *("--tls-cert", str(server.cert), "--tls-key", str(server.key)),
            *("--tls-ca", str(server.ca), "--authz", str(api_pki.authz), "--plugin", name),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("jobworker: error: ")
    assert len(result.stderr.splitlines()) == 1, result.stderr  # one line, no traceback
    assert re.search(message, result.stderr), result.stderr


# -- audit-log: records ---------------------------------------------------------------------


def test_audit_records_of_real_jobs(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    plugins = Plugins()
    plugins.register(audit, "audit-log")
    spool = tmp_path / "spool"
    spool.mkdir()

    async def body(m: JobManager) -> tuple[JobStatus, JobStatus]:
        done = await m.start(sh("echo hi; exit 3", env={"TOKEN": "s3cret"}, cwd="/"), "alice")
        finished = await m.wait(done.job_id)
        stuck = await m.start(sh("trap '' TERM; echo ready; sleep 100"), "alice")
        await anext(m.follow(stuck.job_id))
        stopped = (await m.stop(stuck.job_id, by="bob", grace=0.2)).status
        return finished, stopped

    finished, stopped = run_with_manager(spool, body, plugins=plugins)
    audit.close()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    started, exited, started2, exited2 = records(path)
    assert started == {
        "time": started["time"],
        "audit": "job_started",
        "job_id": finished.job_id,
        "owner": "alice",
        "command": "sh",
        "args": ["-c", "echo hi; exit 3"],
        "cwd": "/",
        "env_names": ["TOKEN"],
        "limits": {
            "cpu": None,
            "cpu_weight": None,
            "memory": None,
            "memory_high": None,
            "pids": None,
            "io": [],
        },
        "applied_limits": started["limits"],
        "containment": "process-group",
        "pid": finished.pid,
        "node": None,
        "started_at": started["started_at"],
    }
    assert "s3cret" not in path.read_text()
    assert started["time"].endswith("Z") and started["started_at"].endswith("Z")
    assert exited["audit"] == "job_exited" and exited["job_id"] == finished.job_id
    assert (exited["reason"], exited["exit_code"], exited["signal"]) == ("exited", 3, None)
    assert (exited["stopped_by"], exited["escalated"]) == (None, False)
    assert exited["usage"] is None
    assert finished.ended_at is not None
    assert exited["duration"] == pytest.approx(finished.ended_at - finished.started_at, abs=1e-5)
    assert exited["time"] >= exited["ended_at"] >= exited["started_at"]

    assert started2["job_id"] == exited2["job_id"] == stopped.job_id
    assert (exited2["reason"], exited2["stopped_by"], exited2["escalated"]) == (
        "stopped",
        "bob",
        True,
    )
    assert (exited2["exit_code"], exited2["signal"]) == (None, signal.SIGKILL)


class DenyRm:
    @hookimpl
    def jobworker_pre_spawn(self, spec: JobSpec) -> None:
        if spec.command == "rm":
            raise PermissionDenied("rm is not allowed here")


def test_audit_records_refused_starts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    plugins = Plugins()
    plugins.register(audit, "audit-log")
    plugins.register(DenyRm(), "deny-rm")
    spool = tmp_path / "spool"
    spool.mkdir()

    async def body(m: JobManager) -> None:
        with pytest.raises(PermissionDenied):
            await m.start(JobSpec("rm", ("-rf", "/tmp/x")), "mallory")
        with pytest.raises(SpawnError):
            await m.start(JobSpec("/no/such/tool", env={"KEY": "s3cret"}), "alice")
        assert m.list() == []

    run_with_manager(spool, body, plugins=plugins)
    audit.close()
    vetoed, missing = records(path)
    assert {k: vetoed[k] for k in ("audit", "owner", "command", "args", "code", "error")} == {
        "audit": "job_refused",
        "owner": "mallory",
        "command": "rm",
        "args": ["-rf", "/tmp/x"],
        "code": "PERMISSION_DENIED",
        "error": "rm is not allowed here",
    }
    assert (missing["audit"], missing["owner"], missing["code"]) == (
        "job_refused",
        "alice",
        "FAILED_PRECONDITION",
    )
    assert "No such file or directory" in missing["error"]
    assert missing["env_names"] == ["KEY"] and "s3cret" not in path.read_text()
    assert vetoed["job_id"] != missing["job_id"]


def test_audit_records_every_decision_of_a_real_server(api_pki: PkiPaths, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    plugins = authz_plugins(api_pki.authz)
    plugins.register(AuditLog(path), "audit-log")
    with running_server(api_pki, plugins=plugins) as server:
        alice, bob = server.stub("alice"), server.stub("bob")
        job_id = start_job(alice, "echo", "hi")
        wait_exited(alice, job_id)
        with pytest.raises(grpc.RpcError) as denied:
            bob.GetStatus(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        assert denied.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as stranger:
            server.stub(NOT_WHITELISTED).ListJobs(pb.ListJobsRequest(), timeout=RPC_TIMEOUT_S)
        assert stranger.value.code() is grpc.StatusCode.PERMISSION_DENIED

    decisions = [r for r in records(path) if r["audit"] == "decision"]
    summary = [(r["identity"], r["action"], r["job_id"], r["allowed"]) for r in decisions]
    assert summary == [
        ("alice", "start", None, True),
        ("alice", "stream", job_id, True),
        ("alice", "status", job_id, True),
        ("bob", "status", job_id, False),
        (NOT_WHITELISTED, "list", None, False),
    ]
    assert decisions[0]["reason"] == "allowed"
    assert decisions[3]["reason"] == f"job {job_id!r} not found"
    assert "not on the authorization whitelist" in decisions[4]["reason"]
    assert decisions[0]["identity_names"] == ["alice"]
    kinds = [r["audit"] for r in records(path)]
    assert kinds.count("job_started") == kinds.count("job_exited") == 1


# -- audit-log: rotation and failing disks -----------------------------------------------


def _status(job_id: str = "j1") -> JobStatus:
    from jobworker.model import JobState

    return JobStatus(
        job_id=job_id,
        spec=JobSpec("true"),
        owner="alice",
        state=JobState.RUNNING,
        pid=1,
        started_at=0.0,
        containment="process-group",
    )


def _fds_open_on(path: Path) -> set[int]:
    """This process's descriptors whose file is (or was, before a rename) ``path``'s."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.removesuffix(" (deleted)") == str(path):
            found.add(int(fd))
    return found


def test_audit_log_follows_a_moved_or_removed_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.job_started(_status("one"))
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate's default: move, then "create"
    audit.job_started(_status("two"))
    (tmp_path / "audit.jsonl").unlink()  # removed outright
    audit.job_started(_status("three"))
    audit.close()

    assert [r["job_id"] for r in records(tmp_path / "audit.jsonl.1")] == ["one"]
    assert [r["job_id"] for r in records(path)] == ["three"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.fixture
def sighup_restored() -> Iterator[list[int]]:
    """A SIGHUP handler that records its calls, restored to what it was afterwards."""
    calls: list[int] = []
    saved = signal.getsignal(signal.SIGHUP)

    def earlier(signum: int, frame: types.FrameType | None) -> None:
        calls.append(signum)

    signal.signal(signal.SIGHUP, earlier)
    yield calls
    signal.signal(signal.SIGHUP, saved)


@pytest.fixture
def audit_log_plugin() -> Iterator[Plugins]:
    """``--plugin audit-log`` as the server loads it, shut down afterwards."""
    plugins = Plugins()
    plugins.load(["audit-log"])
    yield plugins
    plugins.shutdown()


def test_sighup_reopens_through_the_cli_hooks(
    tmp_path: Path, sighup_restored: list[int], audit_log_plugin: Plugins
) -> None:
    path = tmp_path / "audit.jsonl"
    parser = argparse.ArgumentParser()
    audit_log_plugin.add_options(parser)
    assert "audit-log" in [group.title for group in parser._action_groups]
    audit_log_plugin.configure(parser.parse_args(["--audit-log", str(path)]))
    audit_log_plugin.job_started(_status("before"))
    (fd_before,) = _fds_open_on(path)

    os.kill(os.getpid(), signal.SIGHUP)  # the default action would end this process
    audit_log_plugin.on_exit(_status("after"))

    (fd_after,) = _fds_open_on(path)
    assert fd_after != fd_before  # a fresh open, and the old descriptor is closed
    assert sighup_restored == [signal.SIGHUP]  # the handler that was there still runs
    assert [r["job_id"] for r in records(path)] == ["before", "after"]


def test_unopenable_destination_refuses_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot open audit log .*No such file or directory"):
        AuditLog(tmp_path / "no" / "such" / "dir" / "audit.jsonl")


def test_failing_disk_never_stops_jobs_and_is_reported_once(tmp_path: Path) -> None:
    link = tmp_path / "audit.jsonl"
    link.symlink_to("/dev/full")  # every write fails with ENOSPC
    plugins = Plugins()
    plugins.register(AuditLog(link), "audit-log")
    spool = tmp_path / "spool"
    spool.mkdir()

    async def body(m: JobManager) -> list[JobStatus]:
        jobs = [await m.start(sh(f"echo {i}; exit {i}"), "alice") for i in range(3)]
        return list(await asyncio.gather(*(m.wait(j.job_id) for j in jobs)))

    with structlog.testing.capture_logs() as logs:
        finals = run_with_manager(spool, body, plugins=plugins)
        assert [f.exit.exit_code for f in finals if f.exit] == [0, 1, 2]
        failed = [e for e in logs if e["event"] == "audit_log_write_failed"]
        assert len(failed) == 1  # one report for the streak of six lost records
        assert failed[0]["error"] == "No space left on device"
        assert failed[0]["log_level"] == "error"

        # The disk is back (logrotate, or an operator, points the path somewhere sane).
        link.unlink()
        plugins.decision(ALICE, Action.LIST, None, True, "allowed")
    recovered = [e for e in logs if e["event"] == "audit_log_recovered"]
    assert [e["lost_records"] for e in recovered] == [6]
    assert [r["audit"] for r in records(link)] == ["decision"]

"""The live-restore job record: its versions, its refusals, and how a process is told apart
from a later one with the same pid; and the scan of a spool another process wrote."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from jobworker.backends.local.outputlog import OutputLog
from jobworker.backends.local.record import (
    RECORD_VERSION,
    JobEnd,
    JobRecord,
    ProcessIdentity,
    RecordError,
    identify,
)
from jobworker.backends.local.spoolwriter import scan
from jobworker.jobspec import IoLimit, JobSpec, Limits
from jobworker.model import ExitInfo, ResourceUsage, Stream, TerminationReason


@pytest.fixture
def leader() -> Iterator[subprocess.Popen[bytes]]:
    """A process leading its own session, as a job's first process does."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def _record(process: ProcessIdentity) -> JobRecord:
    limits = Limits(memory=64 << 20, io=(IoLimit("8:0", wbps=1 << 20),))
    return JobRecord(
        job_id="j1",
        owner="alice",
        spec=JobSpec("sh", ("-c", "exit 7"), env={"A": "b"}, limits=limits, stdin=True),
        started_at=1.5,
        process=process,
        containment="cgroupv2:/sys/fs/cgroup/worker_jobs/j1",
        applied_limits=limits,
        user="nobody",
        uid=65534,
        isolation="namespaces, user nobody(65534), network host",
        spool="j1.out",
        exit_report="j1.exit",
        max_output_bytes=1 << 30,
    )


def test_a_record_reads_back_as_written_running_and_ended(
    tmp_path: Path, leader: subprocess.Popen[bytes]
) -> None:
    record = _record(ProcessIdentity.of(leader.pid))
    record.write(tmp_path)
    assert JobRecord.read(tmp_path / "j1.job") == record
    end = JobEnd(
        ExitInfo(TerminationReason.STOPPED, signal=15, stopped_by="bob", escalated=True),
        ended_at=9.0,
        usage=ResourceUsage(cpu_usage_usec=5),
        output_seen=10,
        output_cut="a reason",
    )
    ended = attrs.evolve(record, end=end)
    ended.write(tmp_path)
    assert JobRecord.read(tmp_path / "j1.job") == ended
    assert json.loads((tmp_path / "j1.job").read_text())["version"] == RECORD_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["j1.job"]  # no partial file left


@pytest.mark.parametrize("version", [None, 0, RECORD_VERSION + 1, "1"])
def test_a_record_of_a_version_this_server_does_not_read_is_refused(
    tmp_path: Path, leader: subprocess.Popen[bytes], version: object
) -> None:
    _record(ProcessIdentity.of(leader.pid)).write(tmp_path)
    path = tmp_path / "j1.job"
    data = json.loads(path.read_text())
    data["version"] = version
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=f"version {version!r}; this server reads versions 1"):
        JobRecord.read(path)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda text: text[: len(text) // 2], "unreadable"),
        (lambda text: text.replace('"owner"', '"proprietor"'), "damaged"),
        (lambda text: text.replace('"exit_report"', '"exit_note"'), "damaged"),
        (lambda text: text.replace('"cpu": null', '"cpu": -1'), "damaged"),
    ],
)
def test_a_damaged_record_is_refused(
    tmp_path: Path, leader: subprocess.Popen[bytes], damage: object, why: str
) -> None:
    _record(ProcessIdentity.of(leader.pid)).write(tmp_path)
    path = tmp_path / "j1.job"
    path.write_text(damage(path.read_text()))  # type: ignore[operator]
    with pytest.raises(RecordError, match=why):
        JobRecord.read(path)


def test_the_first_v1_records_still_read(tmp_path: Path, leader: subprocess.Popen[bytes]) -> None:
    record = _record(ProcessIdentity.of(leader.pid))
    data = json.loads(record.to_json())
    data["stdin_closed"] = False  # what the first version with live restore wrote too
    (tmp_path / "j1.job").write_text(json.dumps(data))
    assert JobRecord.read(tmp_path / "j1.job") == record


def test_a_process_is_the_recorded_one_only_with_its_start_time_boot_and_session(
    leader: subprocess.Popen[bytes],
) -> None:
    identity = ProcessIdentity.of(leader.pid)
    assert identify(identity) is None
    later = attrs.evolve(identity, start_ticks=identity.start_ticks + 1)
    assert (
        identify(later) == f"pid {leader.pid} now belongs to another process (a later start time)"
    )
    rebooted = attrs.evolve(identity, boot_id="another boot")
    assert identify(rebooted) == "the host has rebooted since the job started"
    mine = ProcessIdentity.of(os.getpid())
    if os.getsid(0) != os.getpid():
        assert "does not lead its session" in str(identify(mine))
    leader.kill()
    leader.wait()
    assert identify(identity) == f"process {leader.pid} is gone"
    with pytest.raises(ProcessLookupError):
        ProcessIdentity.of(leader.pid)


def test_a_scan_finds_what_the_writer_published(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "j.out")
    for i in range(600):  # more than two marks' worth of records
        log.append(Stream.STDOUT if i % 2 else Stream.STDERR, b"x" * (i % 7 + 1))
    written = log.size
    expected_marks = log._marks[1:]
    os.pwrite(log.fd, b"\x01\x00\x00\x01\x00half", written)  # a record left half-written
    state = scan(log.fd, None, None)
    assert (state.size, state.payload, state.records) == (written, log.kept_bytes, 600)
    assert state.seen == log.kept_bytes and state.charged == written
    assert list(state.marks) == expected_marks
    cut = scan(log.fd, log.kept_bytes + 99, "a cap")
    assert (cut.seen, cut.cut) == (log.kept_bytes + 99, "a cap")

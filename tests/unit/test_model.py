"""The job model validates itself, and the wire translates both ways without losing a value."""

from __future__ import annotations

import re
import signal
from typing import Any

import pytest

from jobworker import model
from jobworker.api import codec, wire
from jobworker.errors import InvalidArgument
from jobworker.jobspec import MAX_IO_DEVICES, MAX_LIMIT_VALUE, IoLimit, JobSpec, Limits
from jobworker.model import ExitInfo, JobStatus, JobStatusView, TerminationReason, shell_exit_code
from jobworker.v1 import jobworker_pb2 as pb


def test_limits_cannot_hold_an_invalid_value() -> None:
    with pytest.raises(InvalidArgument, match="give a positive number of cores"):
        Limits(cpu=-1)
    with pytest.raises(InvalidArgument, match="too large"):
        Limits(memory=MAX_LIMIT_VALUE + 1)
    with pytest.raises(InvalidArgument, match="more than once"):
        Limits(io=[IoLimit("8:0", rbps=1), IoLimit("8:0", wbps=1)])
    with pytest.raises(InvalidArgument, match=f"at most {MAX_IO_DEVICES}"):
        Limits(io=[IoLimit(f"8:{n}", rbps=1) for n in range(MAX_IO_DEVICES + 1)])
    with pytest.raises(InvalidArgument, match="device is empty"):
        IoLimit("", rbps=1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cpu": 0}, "give a positive number of cores"),
        ({"cpu": float("nan")}, "give a positive number of cores"),
        ({"cpu_weight": 0}, "between 1 and 10000"),
        ({"cpu_weight": 10001}, "between 1 and 10000"),
        ({"memory": 8 << 20, "memory_high": 16 << 20}, "give a memory high at or below it"),
        ({"pids": 0}, "pids 0: give at least 1"),
    ],
)
def test_limits_the_host_does_not_decide_are_refused_by_the_model(
    fields: dict[str, Any], message: str
) -> None:
    """The plugin never sees them: a Limits holding them cannot be built."""
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        Limits(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "sets no rate"),
        ({"rbps": 0}, "rbps for '8:0' 0: give at least 1"),
    ],
)
def test_io_limits_the_host_does_not_decide_are_refused_by_the_model(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        IoLimit(device="8:0", **fields)


def test_a_spec_checks_itself() -> None:
    with pytest.raises(InvalidArgument, match="command is empty"):
        JobSpec("")
    with pytest.raises(InvalidArgument, match="NUL"):
        JobSpec("echo", env={"A": "x\0y"})


#: Every field set, each to a value of its own.
LIMITS = Limits(0.5, 200, 64 << 20, 32 << 20, 10, [IoLimit("8:0", rbps=1, wiops=2)])


@pytest.mark.parametrize("limits", [Limits(), LIMITS])
def test_limits_survive_the_wire(limits: Limits) -> None:
    assert wire.limits_from_pb(wire.limits_to_pb(limits)) == limits


def _status(exit: ExitInfo | None) -> JobStatus:
    return JobStatus(
        job_id="j",
        spec=JobSpec("true"),
        owner="alice",
        state=model.JobState.RUNNING if exit is None else model.JobState.EXITED,
        pid=1,
        started_at=1.0,
        ended_at=None if exit is None else 2.0,
        containment="process-group",
        exit=exit,
    )


@pytest.mark.parametrize(
    ("exit", "wire_code", "exit_code", "shell"),
    [
        (None, 0, None, None),
        (ExitInfo(TerminationReason.EXITED, exit_code=3), 3, 3, 3),
        (ExitInfo(TerminationReason.SIGNALED, signal=signal.SIGKILL), 137, None, 137),
    ],
)
def test_the_exit_convention_is_kept_both_ways(
    exit: ExitInfo | None, wire_code: int, exit_code: int | None, shell: int | None
) -> None:
    reply = wire.status_to_pb(_status(exit))
    assert reply.exit_code == wire_code
    view = wire.status_from_pb(reply)
    assert (view.exit_code, view.shell_exit_code) == (exit_code, shell)
    assert shell_exit_code(view.exit_code, view.signal) == shell
    assert view == JobStatusView.from_status(_status(exit))  # nothing lost on the way


@pytest.mark.parametrize(
    ("exit", "state", "reason", "exit_code"),
    [
        (None, "running", "", None),
        (ExitInfo(TerminationReason.EXITED, exit_code=3), "exited", "exited", 3),
        (ExitInfo(TerminationReason.EXITED, exit_code=0), "exited", "exited", 0),
        (ExitInfo(TerminationReason.SIGNALED, signal=signal.SIGKILL), "exited", "signaled", 137),
        (ExitInfo(TerminationReason.NODE_LOST), "exited", "node_lost", None),
        (ExitInfo(TerminationReason.LOST), "exited", "lost", None),
    ],
)
def test_the_end_of_a_stream_reads_as_the_view_does(
    exit: ExitInfo | None, state: str, reason: str, exit_code: int | None
) -> None:
    status = _status(exit)
    reply = wire.status_to_pb(status)
    chunk = pb.JobOutputChunk(offset=9, status=reply).SerializeToString()
    stream, data, offset, end, _redirect = codec.decode_chunk(chunk)
    assert (stream, bytes(data), offset) == ("", b"", 9)
    assert end is not None
    assert codec.decode_end(end) == codec.JobEnd("j", state, reason, exit_code, "")
    view = JobStatusView.from_status(status)
    assert (view.state.value, view.shell_exit_code) == (state, exit_code)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", ()), "command is empty: give the program to run"),
        (("echo", ("a\0b",)), "argument contains a NUL byte, which no process can receive"),
    ],
)
def test_a_refused_spec_says_what_to_change_in_full(
    args: tuple[str, tuple[str, ...]], message: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        JobSpec(*args)
    assert str(refused.value) == message

"""The cluster agents' fallback containment and start-up sweep, on real processes
(jobworker/backends/ray/tree.py; needs no Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobworker.backends.ray.guard import start_guard
from jobworker.backends.ray.tree import ProcessTree, ProcRecords, start_time


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def gone_soon(*pids: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def spawn() -> Iterator[object]:
    """Start ``sh -c SCRIPT`` as a job is started (its own session); read its first line."""
    started: list[subprocess.Popen[bytes]] = []
    others: list[int] = []

    def run(script: str) -> tuple[subprocess.Popen[bytes], list[int]]:
        proc = subprocess.Popen(
            ["sh", "-c", script], stdout=subprocess.PIPE, start_new_session=True
        )
        started.append(proc)
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        others.extend(pids)
        return proc, pids

    yield run
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the job's whole group, like a stop
        except ProcessLookupError:
            pass
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    for pid in others:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_stop_reaches_a_setsid_child_even_when_its_shell_dies_first(spawn: object) -> None:
    assert callable(spawn)
    # The shell dies of SIGTERM at once; its setsid child ignores SIGTERM and must still
    # get the SIGKILL that follows, though it is no longer below the shell.
    proc, (child,) = spawn("setsid sh -c 'trap \"\" TERM; echo $$; exec sleep 300' & wait")
    tree = ProcessTree()
    tree.attach(proc.pid)
    tree.signal(signal.SIGTERM)
    proc.wait(5)
    assert alive(child)
    tree.kill()
    assert gone_soon(child)


def test_sweep_kills_a_recorded_tree_and_spares_a_reused_pid(spawn: object, tmp_path: Path) -> None:
    assert callable(spawn)
    recorded, (child,) = spawn("setsid sleep 300 & echo $!; wait")
    stranger, _ = spawn("echo; exec sleep 300")
    records = ProcRecords(tmp_path / "procs")
    records.directory.mkdir()
    records.add("job-a", recorded.pid)
    # A record whose pid now belongs to someone else: the start time does not match.
    started = start_time(stranger.pid)
    assert started is not None
    (records.directory / "job-b").write_text(f"{stranger.pid} {started - 1}\n")
    assert records.sweep() == ["job-a"]
    recorded.wait(5)
    assert gone_soon(child)
    assert alive(stranger.pid)
    assert list(records.directory.iterdir()) == []


def test_sweep_kills_the_group_of_a_first_process_that_is_gone(
    spawn: object, tmp_path: Path
) -> None:
    assert callable(spawn)
    leader, (member,) = spawn("sleep 300 & echo $!")
    records = ProcRecords(tmp_path / "procs")
    records.directory.mkdir()
    records.add("job-c", leader.pid)
    leader.wait(5)  # the first process exits; its background sleep stays in the group
    assert alive(member)
    assert records.sweep() == ["job-c"]
    assert gone_soon(member)


@pytest.mark.parametrize("dies", ["raylet", "agent"])
def test_the_guard_kills_the_recorded_jobs_when_the_raylet_or_the_agent_dies(
    spawn: object, tmp_path: Path, dies: str
) -> None:
    """jobworker/backends/ray/guard.py, with stand-ins for the agent and the raylet."""
    assert callable(spawn)
    agent, _ = spawn("echo; exec sleep 300")
    raylet, _ = spawn("echo; exec sleep 300")
    job, (child,) = spawn("setsid sleep 300 & echo $!; wait")
    records = ProcRecords(tmp_path / "procs")
    records.directory.mkdir()
    records.add("job-d", job.pid)
    start_guard(records.directory, agent.pid, raylet.pid)
    time.sleep(0.5)
    assert alive(job.pid) and alive(child)  # nothing happens while both live
    (raylet if dies == "raylet" else agent).kill()
    assert gone_soon(job.pid, child)
    agent.wait(5)  # the guard kills the agent too
    assert agent.returncode == -signal.SIGKILL
    assert list(records.directory.iterdir()) == []

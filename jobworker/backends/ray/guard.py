"""The guard: a node's jobs die with its agent, or with the raylet the agent serves.

A job on a node is accounted for by its agent (its status, its quota, its stop). When the
agent dies, or the node's raylet does (the node leaves the cluster: the front will soon say
``node_lost``), nobody could stop the job any more. Ray itself kills an actor's direct
children at best; a job's processes are further down.

So each agent starts one guard, a small process of its own that neither Ray nor the
agent's death takes down (a new session, re-parented away from the agent at once). It
holds a pidfd of the agent and one of the raylet and sleeps until either exits; then it
stops the agent (SIGSTOP: it reports nothing more, so no job's end is reported as an
ordinary one), kills every job recorded in the agent's :class:`~.tree.ProcRecords`
(with isolation, a job's first process is the init of its PID namespace: the kernel then
kills every process of the job), and kills the agent. It reacts within milliseconds; the
front says ``node_lost`` only later, once Ray declares the node dead.

Run as ``python -m jobworker.backends.ray.guard RECORDS AGENT_PID RAYLET_PID``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from jobworker.backends.ray.tree import ProcRecords


def start_guard(records: Path, agent: int, raylet: int) -> None:
    """Start the guard of ``agent`` (this process) and ``raylet``; returns once it runs
    on its own (the intermediate process has exited)."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", __spec__.name, str(records), str(agent), str(raylet)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    launcher.wait()


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _signal(pidfd: int | None, signum: int) -> None:
    if pidfd is None:
        return
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass


def guard(records: Path, agent: int | None, raylet: int | None) -> list[str]:
    """Wait until the agent or the raylet exits (pidfds; None: already gone), then kill
    the recorded jobs and the agent; return the ids of the jobs killed."""
    if agent is not None and raylet is not None:
        select.select([agent, raylet], [], [])  # a pidfd turns readable when its process exits
    _signal(agent, signal.SIGSTOP)
    try:
        return ProcRecords(records).sweep()
    finally:
        _signal(agent, signal.SIGKILL)  # never left stopped


def main() -> None:
    records, agent = Path(sys.argv[1]), int(sys.argv[2])
    # Opened before the launcher exits: the agent waits for it, so its pid is still its.
    agent_fd, raylet_fd = _pidfd(agent), _pidfd(int(sys.argv[3]))
    if os.fork():
        os._exit(0)  # the agent reaps the launcher; the guard lives on, re-parented
    killed = guard(records, agent_fd, raylet_fd)
    if killed:
        print(f"jobworker guard: killed jobs {' '.join(killed)} of agent {agent}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""A job's process tree as its containment on a node without a cgroup plugin, and the sweep
of trees an agent left behind when it died.

Without cgroups a job is its session plus every descendant of its first process, found by
walking ``/proc``: ``stop`` reaches children that called ``setsid`` (the plain
:class:`~jobworker.backends.local.containment.ProcessGroup` does not). A process whose parent
already
exited is re-parented out of the tree and escapes; only a cgroup (``--plugin cgroupv2``
on the nodes) closes that gap.

An agent records each running job's first process (pid and kernel start time) in a file;
when a node's agent starts, the records left by an agent that died with its raylet name
process trees that may still run with nobody to stop them: it kills them, after checking
the start time so that a reused pid is never hit. (With ``--plugin cgroupv2`` the plugin's
own start-up removes leftover job cgroups, which catches every process.)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import attrs

from jobworker.backends.local.containment import ContainmentReport
from jobworker.jobspec import Limits


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    return stat.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def _children(pid: int) -> list[int] | None:
    """``pid``'s children from ``/proc/PID/task/*/children``; None if the kernel keeps no
    such lists (CONFIG_PROC_CHILDREN), [] if ``pid`` is gone."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except FileNotFoundError:
            if Path(f"/proc/{pid}/task/{tid}").exists():
                return None
        except OSError:
            continue  # the thread ended meanwhile
    return found


def _all_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(root: int) -> list[int]:
    """Every live process below ``root``, parents first: read along the tree from each
    process's children list, or, where the kernel keeps none, from one walk over every
    process of the machine."""
    table: dict[int, list[int]] | None = None
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        below = _children(pid) if table is None else table.get(pid, [])
        if below is None:
            table = _all_children()
            below = table.get(pid, [])
        found += below
        todo += below
    return found


def _exited(pid: int) -> bool:
    """Gone or a zombie: its children, if any, were re-parented away when it exited."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] == "Z"


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def signal_tree(root: int, signum: int) -> None:
    """``signum`` to ``root``'s process group and every descendant (found first: once a
    parent dies its children are re-parented out of the tree)."""
    below = descendants(root)
    try:
        os.killpg(root, signum)
    except ProcessLookupError:
        pass
    for pid in below:
        _kill(pid, signum)


@attrs.define
class ProcessTree:
    """Containment: the job's process group and every descendant of its first process.

    Every process seen in the tree is remembered (with its start time), so that one whose
    parent dies between two signals (a shell killed by SIGTERM leaves its children to
    init) still gets the next signal, SIGKILL included.
    """

    _root: int | None = None
    _seen: dict[int, int] = attrs.Factory(dict)  # pid -> start time

    @property
    def name(self) -> str:
        return "process-tree"

    @property
    def join_path(self) -> str | None:
        return None

    @property
    def applied(self) -> Limits:
        return Limits()

    def attach(self, pid: int) -> None:
        self._root = pid

    def signal(self, signum: int) -> None:
        if self._root is None:
            return
        # Look before signalling: a child must be found while its parent still lives.
        # (Once the first process has exited nothing is below it any more.)
        if not _exited(self._root):
            for pid in descendants(self._root):
                started = start_time(pid)
                if started is not None:
                    self._seen.setdefault(pid, started)
        try:
            os.killpg(self._root, signum)
        except ProcessLookupError:
            pass
        for pid, started in list(self._seen.items()):
            if start_time(pid) == started:
                _kill(pid, signum)
            else:
                del self._seen[pid]

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self._root is not None and not _exited(self._root):
            self.signal(signal.SIGKILL)  # a process may fork while we walk: a second pass

    async def wait_empty(self) -> None:
        return None  # as for a process group, the manager waits for the pipes to close

    def report(self) -> ContainmentReport:
        return ContainmentReport()

    def release(self) -> None:
        self._root = None
        self._seen.clear()


@attrs.frozen
class ProcRecords:
    """One file per running job: ``<pid> <start time>`` of its first process."""

    directory: Path

    def add(self, job_id: str, pid: int) -> None:
        started = start_time(pid)
        if started is not None:
            (self.directory / job_id).write_text(f"{pid} {started}\n")

    def remove(self, job_id: str) -> None:
        (self.directory / job_id).unlink(missing_ok=True)

    def sweep(self) -> list[str]:
        """Kill the process trees recorded by a previous agent; return their job ids."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        swept = []
        for record in self.directory.iterdir():
            try:
                pid_text, started_text = record.read_text().split()
                pid, started = int(pid_text), int(started_text)
            except (OSError, ValueError):
                record.unlink(missing_ok=True)
                continue
            now = start_time(pid)
            if now == started:
                for _ in range(2):
                    signal_tree(pid, signal.SIGKILL)
                swept.append(record.name)
            elif now is None:
                # The first process is gone; while any member of its process group lives
                # the kernel does not reuse the number, so a group by that id is the job's.
                try:
                    os.killpg(pid, signal.SIGKILL)
                    swept.append(record.name)
                except ProcessLookupError:
                    pass
            record.unlink(missing_ok=True)
        return swept

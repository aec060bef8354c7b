"""What a containment is: the set of processes that make up one job.

A ``jobworker_limits_apply`` implementation returns a :class:`Containment` (the cgroupv2
plugin returns a cgroup); without one, the core falls back to :class:`ProcessGroup`. The
job manager only ever talks to this protocol, so "stop the whole tree" means the same
thing whatever contains the job.
"""

from __future__ import annotations

import os
import signal
from typing import Protocol

import attrs

from jobworker.jobspec import Limits
from jobworker.model import ResourceUsage


@attrs.frozen
class ContainmentReport:
    """What the containment saw once the job was over."""

    oom_killed: bool = False
    usage: ResourceUsage | None = None


class Containment(Protocol):
    """One job's processes. Methods are called from the event loop and must not block long."""

    @property
    def name(self) -> str:
        """Shown in status, e.g. ``cgroupv2:/sys/fs/cgroup/worker_jobs/<id>``."""

    @property
    def join_path(self) -> str | None:
        """A file the launcher writes ``0`` to before ``execve`` (``cgroup.procs``), or None."""

    @property
    def applied(self) -> Limits:
        """The limits actually in force."""

    def attach(self, pid: int) -> None:
        """Called once the launcher runs (before the user's command starts)."""

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every process of the job."""

    def kill(self) -> None:
        """SIGKILL every process of the job, including ones that left its process group."""

    async def wait_empty(self) -> None:
        """Return once no process of the job remains (without polling where possible)."""

    def report(self) -> ContainmentReport:
        """Final accounting; called after :meth:`wait_empty`."""

    def release(self) -> None:
        """Remove what was created for the job. Idempotent.

        May block briefly (the kernel can refuse to remove a cgroup for a moment after its
        last process exited): the job manager calls it in a worker thread, never on the
        event loop, once the job's processes are gone.
        """


@attrs.define
class ProcessGroup:
    """Fallback containment: the job's session/process group, led by the launched process.

    It cannot see processes that call ``setsid`` to leave the group; the server says so at
    start-up and the cgroupv2 plugin closes that gap.
    """

    _pgid: int | None = None

    @property
    def name(self) -> str:
        return "process-group"

    @property
    def join_path(self) -> str | None:
        return None

    @property
    def applied(self) -> Limits:
        return Limits()

    def attach(self, pid: int) -> None:
        self._pgid = pid  # the launcher calls setsid(), so its pid is the group id

    def signal(self, signum: int) -> None:
        if self._pgid is not None:
            try:
                os.killpg(self._pgid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def wait_empty(self) -> None:
        # A process group cannot be watched; the manager waits for the pipes to close.
        return None

    def report(self) -> ContainmentReport:
        return ContainmentReport()

    def release(self) -> None:
        self._pgid = None


@attrs.frozen
class Ended:
    """The containment of a job whose processes this server cannot reach: one that ended
    before it started (live restore), or whose containment could not be adopted. Status
    still names it; there is nothing to signal, wait for or release."""

    name: str
    applied: Limits = attrs.field(factory=Limits)

    @property
    def join_path(self) -> str | None:
        return None

    def attach(self, pid: int) -> None:
        return None

    def signal(self, signum: int) -> None:
        return None

    def kill(self) -> None:
        return None

    async def wait_empty(self) -> None:
        return None

    def report(self) -> ContainmentReport:
        return ContainmentReport()

    def release(self) -> None:
        return None

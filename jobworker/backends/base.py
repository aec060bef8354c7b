"""What a job engine is: the seam between the API and whatever runs the jobs.

The gRPC service, ``serve`` and plugins (through ``jobworker_manager_ready``) only ever
talk to this protocol. :class:`jobworker.backends.local.manager.JobManager` is the default
implementation
(jobs on this host); a cluster backend implements the same methods, so nothing here names
a local detail such as a pid or a pidfd.

Every method runs on the server's event loop. Errors are :mod:`jobworker.errors` classes:
an unknown id raises :func:`jobworker.errors.job_not_found`'s NotFound.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from jobworker.jobspec import JobSpec
from jobworker.model import InputChunk, InputResult, JobStatus, OutputChunk, StopResult

if TYPE_CHECKING:
    from jobworker.api.codec import Redirect


class JobBackend(Protocol):
    """Starts, tracks, streams and stops jobs, and owns them until :meth:`shutdown`."""

    async def start(self, spec: JobSpec, owner: str) -> JobStatus:
        """Run ``spec`` for ``owner``; return once the command runs.

        Raises InvalidArgument, SpawnError, ResourceExhausted, FailedPrecondition, or the
        error a plugin vetoed with; on any error nothing of the job remains.
        """

    async def stop(self, job_id: str, by: str, grace: float | None = None) -> StopResult:
        """SIGTERM the whole job, SIGKILL after ``grace`` seconds (None: the default).

        Concurrent stops share one; stopping a finished job answers so, without error.
        """

    def find(self, job_id: str) -> JobStatus | None:
        """The job's snapshot, or None for an unknown id."""

    def get(self, job_id: str) -> JobStatus:
        """The job's snapshot; raises NotFound for an unknown id."""

    def list(self) -> builtins.list[JobStatus]:
        """A snapshot of every job still retained, running or finished."""

    def follow(
        self, job_id: str, offset: int = 0, follow: bool = True
    ) -> AsyncIterator[OutputChunk]:
        """The job's output from byte ``offset``; with ``follow`` until the job is over."""

    async def output_redirect(
        self, job_id: str, client_cert: bytes, client: str, max_streams: int | None
    ) -> Redirect | None:
        """Where ``client`` (already admitted to read ``job_id``; ``client_cert`` its
        certificate, PEM) may read the job's output itself, from the machine that runs it
        (a cluster node's port, docs/cluster.md "Direct output"); None: through
        :meth:`follow` (one server has nothing nearer)."""

    async def write_input(self, job_id: str, chunks: AsyncIterator[InputChunk]) -> InputResult:
        """Copy ``chunks`` into the stdin of a job started with ``spec.stdin``.

        Takes the next chunk only once the previous one is in the job's pipe (bounded
        buffering, back-pressure to the writer); ``eof`` closes stdin. Raises
        FailedPrecondition when stdin is not open or another writer holds it.
        """

    async def wait(self, job_id: str) -> JobStatus:
        """Return the job's final snapshot once it is over."""

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop every job (grace, then kill) and release everything; called once."""

"""The front server's engine for a Ray cluster: the job engine's surface over node agents.

Where things happen:

* on the front: authorization and its decision (the gRPC service), ``pre_spawn``,
  ``start_refused``, placement (:mod:`.placement`), and the relayed observers
  ``job_started``, ``output_chunk`` (only when a plugin wants it: the front then pulls every
  job's output) and ``on_exit`` -- so audit-log and third-party observers see cluster jobs
  as local ones;
* on the node (:mod:`.agent`): ``limits_apply`` and isolation, by the node-side plugins.

The front keeps an in-memory picture of every agent's jobs (:mod:`.table`). Nodes are
found, their agents greeted and their long polls (the heartbeats) merged into the picture
by :mod:`.discovery`; once Ray declares a node dead (its health check, about 15 s by
default) or its agent is gone, that node's running jobs end with ``node_lost``. A
restarted front server rebuilds the picture by polling every agent.

Usage samples (:mod:`jobworker.usage`) are taken on the node by the agent's engine, as on a
single server. ``GetUsage`` asks the job's agent (bounded by ``CALL_TIMEOUT``, like every
agent call); ``ListUsage`` asks every live node's agent at once and leaves out, with a
warning in the log, a node that does not answer within ``USAGE_LIST_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import structlog

from jobworker.api.codec import Redirect
from jobworker.backends.ray.agent import AgentConfig, NodeGoingAway, release_placement
from jobworker.backends.ray.auth import UNAUTHENTICATED_RISK, check_cluster
from jobworker.backends.ray.discovery import Discovery, join
from jobworker.backends.ray.fanout import Fanout
from jobworker.backends.ray.ledger import LedgerClient, Lesson
from jobworker.backends.ray.nodes import CALL_TIMEOUT, Node, Unreachable, call
from jobworker.backends.ray.outputport import PortClient, TicketGrant, output_lost
from jobworker.backends.ray.placement import NoNode, Placer, named
from jobworker.backends.ray.stdin import pieces
from jobworker.backends.ray.table import Job, JobTable
from jobworker.errors import (
    FailedPrecondition,
    InvalidArgument,
    JobworkerError,
    Unavailable,
    client_full,
    server_full,
)
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.model import (
    InputChunk,
    InputResult,
    JobState,
    JobStatus,
    OutputChunk,
    StopResult,
    describe_end,
    new_job_id,
)
from jobworker.usage import JobUsage, UsageSample

log = structlog.get_logger("jobworker.ray.front")

#: How long a start waits for a node to take it when none has joined yet.
NODE_WAIT_SECONDS = 5.0
#: Longest wait for one node's running jobs' usage (``ListUsage``, what ``jobworker top``
#: asks every second): a node slower than that is left out of the answer.
USAGE_LIST_TIMEOUT = 5.0


class RayBackend:
    """The job engine's surface (start, stop, get, find, list, follow, wait, shutdown) on
    a Ray cluster. Create with :meth:`connect`; every method runs on the event loop."""

    def __init__(
        self,
        plugins: Plugins,
        agent_config: AgentConfig,
        *,
        placement_timeout: float = 10.0,
        default_grace: float = 10.0,
        max_running: int = 1000,
        max_running_per_client: int | None = None,
        allow_unauthenticated: bool = False,
        client_ca: bytes | None = None,
    ) -> None:
        self._plugins = plugins
        #: The CA of client certificates (PEM), given to agents for redirected clients;
        #: None: direct output is off and the front relays every stream.
        self._client_ca = client_ca
        self._agent_config = agent_config
        self.default_grace = default_grace
        self._max_running = max_running
        self._max_per_client = max_running_per_client or max_running
        #: The cluster's count of running jobs (:mod:`.ledger`), set once joined.
        self._ledger = LedgerClient(None)
        #: How long a reservation may wait for its agent's answer: the longest start.
        self._start_bound = placement_timeout + NODE_WAIT_SECONDS + CALL_TIMEOUT
        self._nodes: dict[str, Node] = {}
        self._table = JobTable(self._job_ended, self._jobs_learnt)
        self._placer = Placer(self._nodes, placement_timeout)
        self._tasks: set[asyncio.Task[None]] = set()
        #: Reports of ends to the ledger (awaited, not cancelled, at shutdown).
        self._reports: set[asyncio.Task[None]] = set()
        self._closing = False
        self._relay_output = plugins.has_impl("jobworker_output_chunk")
        #: The loop the backend runs on (a scrape's thread hands work to it).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._discovery = Discovery(self._nodes, self._table, agent_config, self._spawn)
        self._ports = PortClient()
        self._fanout = Fanout()
        #: Set once joined: whether the cluster turned away a caller without its token.
        self._authenticated = True
        self._allow_unauthenticated = allow_unauthenticated

    # -- connection ------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, address: str, plugins: Plugins, agent_config: AgentConfig, **kwargs: Any
    ) -> RayBackend:
        """Join the cluster at ``address`` (the head's GCS ``HOST:PORT``) as a driver; the
        agents of its nodes are started or found, and their jobs learnt, in the background
        (:meth:`.discovery.Discovery.run`), so that the server answers at once at any cluster size.

        A cluster that does not authenticate is refused (see :func:`.auth.check_cluster`)
        unless ``allow_unauthenticated``."""

        backend = cls(plugins, agent_config, **kwargs)
        backend._loop = asyncio.get_running_loop()
        backend._authenticated = await check_cluster(
            address, allow_unauthenticated=backend._allow_unauthenticated
        )
        try:
            join(address)
        except Exception as err:
            raise FailedPrecondition(f"cannot join the Ray cluster at {address}: {err}") from err
        backend._ledger = await LedgerClient.join()
        # Discovery runs in the background: the server answers while agents start.
        backend._spawn(backend._discovery.run(), "ray-discover")
        return backend

    def _spawn(
        self, coro: Any, name: str, tasks: set[asyncio.Task[None]] | None = None
    ) -> asyncio.Task[None]:
        tasks = self._tasks if tasks is None else tasks
        task = asyncio.get_running_loop().create_task(coro, name=name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    # -- queries ---------------------------------------------------------------------------

    def find(self, job_id: str) -> JobStatus | None:
        job = self._table.find(job_id)
        return None if job is None else job.status

    def get(self, job_id: str) -> JobStatus:
        return self._table.lookup(job_id).status

    def list(self) -> builtins.list[JobStatus]:
        return self._table.statuses()

    def latest_usage(self) -> builtins.list[tuple[JobStatus, UsageSample]]:
        """The newest sample of every job still kept, with its status (the metrics
        plugin's per-job series). Called at each scrape, on the metrics server's thread:
        the running jobs' newest samples are pulled from the agents then (as ``ListUsage``
        does: every live node at once, within ``USAGE_LIST_TIMEOUT``), so that no
        heartbeat carries usage; a job whose node did not answer keeps an earlier one."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not on the loop: it pulls, this thread waits
            if self._loop is not None and not self._closing:
                pull = asyncio.run_coroutine_threadsafe(self._pull_newest(), self._loop)
                try:
                    pull.result(USAGE_LIST_TIMEOUT + 1)
                except TimeoutError:
                    pull.cancel()
        return self._table.latest_usage()

    async def _pull_newest(self) -> None:
        for job, usage in await self._gather_usage(last=1):
            job.newest_usage = usage.samples[-1] if usage.samples else job.newest_usage

    @property
    def running(self) -> int:
        return self._table.running_count

    @property
    def nodes(self) -> builtins.list[str]:
        return self._discovery.names

    # -- start -----------------------------------------------------------------------------

    async def start(self, spec: JobSpec, owner: str) -> JobStatus:
        """Place and start ``spec`` on a node; errors as :meth:`JobManager.start`, plus
        RESOURCE_EXHAUSTED when no node can take the job."""
        job_id = new_job_id()
        try:
            if self._closing:
                raise FailedPrecondition("the server is shutting down; retry on another server")
            await self._reserve(job_id, owner)
            try:
                spec = self._plugins.pre_spawn(job_id, spec, owner)
                if not self._authenticated:
                    log.warning("ray_cluster_unauthenticated", job_id=job_id,
                                consequence=UNAUTHENTICATED_RISK)  # fmt: skip
                status, node = await self._launch(job_id, spec, owner)
            except BaseException:
                self._ledger.release(job_id)
                raise
        except JobworkerError as err:
            log.info("job_refused", job_id=job_id, owner=owner, code=err.code, error=str(err))
            self._plugins.start_refused(job_id, spec, owner, err)
            raise
        self._ledger.hold(job_id, owner, node.node_id)
        if self._table.find(job_id) is None:  # else its node's poll brought it already
            self._table.add(status, node)
        log.info("job_started", job_id=job_id, owner=owner, command=spec.command,
                 node=node.name, pid=status.pid)  # fmt: skip
        self._plugins.job_started(status)
        if self._relay_output:
            self._spawn(self._relay(job_id), f"ray-relay-{job_id}")
        return status

    async def _reserve(self, job_id: str, owner: str) -> None:
        """Take a slot of ``--max-jobs`` and ``--max-jobs-per-client`` in the cluster's
        ledger, where every front server's jobs count."""
        limits = (self._max_running, self._max_per_client)
        refused = await self._ledger.reserve(
            job_id, owner, limits, self._start_bound, self._running_jobs
        )
        if refused is not None:
            total, mine = refused
            if total >= self._max_running:
                raise server_full(total, self._max_running)
            raise client_full(owner, mine, self._max_per_client)

    def _running_jobs(self) -> Lesson:
        """What this front teaches a ledger it has not taught (:mod:`.ledger`)."""
        return {j.status.job_id: (j.status.owner, j.node.node_id) for j in self._table.running()}

    def _job_ended(self, status: JobStatus) -> None:
        self._spawn(self._report_end(status), f"ray-end-{status.job_id}", self._reports)

    async def _report_end(self, status: JobStatus) -> None:
        """Give the job's slot back; the first front server to report the end writes its
        ``job_exited`` record (``on_exit``), so that each end is recorded once."""
        try:
            first = await self._ledger.end(status.job_id)
        except Unavailable as err:
            log.warning("ledger_unreachable", job_id=status.job_id, error=str(err),
                        consequence="its end is recorded here, maybe by others too")  # fmt: skip
            first = True
        if first:
            self._plugins.on_exit(status)

    def _jobs_learnt(self, node: Node, statuses: builtins.list[JobStatus]) -> None:
        self._spawn(self._adopt(node, statuses), "ray-adopt", self._reports)

    async def _adopt(self, node: Node, statuses: builtins.list[JobStatus]) -> None:
        """Have the ledger count jobs this front found on ``node``; write the records of
        those that ended while no front server watched."""
        running = {s.job_id: s.owner for s in statuses if s.state is not JobState.EXITED}
        ended = {s.job_id: s for s in statuses if s.state is JobState.EXITED}
        try:
            unreported = await self._ledger.adopt(node.node_id, running, list(ended))
        except Unavailable as err:
            log.warning("ledger_unreachable", jobs=len(statuses), error=str(err),
                        consequence="these jobs are not counted in the quotas")  # fmt: skip
            return
        for job_id in unreported:
            self._plugins.on_exit(ended[job_id])

    async def _launch(self, job_id: str, spec: JobSpec, owner: str) -> tuple[JobStatus, Node]:
        """Place the job and have its node's agent start it. A job refused by a node going
        away is placed once more (that node is suspect now) unless something ties it
        there (a pin, a placement group): then the refusal (UNAVAILABLE) is the client's."""
        node, placement = await self._place(job_id, spec)
        try:
            return await self._start_on(node, placement, job_id, spec, owner), node
        except NodeGoingAway as err:
            if spec.node is not None or placement is not None:
                raise
            log.warning("job_start_moved", job_id=job_id, node=node.name, error=str(err))
        node, placement = await self._place(job_id, spec)
        return await self._start_on(node, placement, job_id, spec, owner), node

    async def _start_on(
        self, node: Node, placement: str | None, job_id: str, spec: JobSpec, owner: str
    ) -> JobStatus:
        """The agent's start; a node that fails the call, or is going away, is suspect."""
        try:
            status: JobStatus = await call(
                node.agent.start.remote(job_id, attrs.evolve(spec, node=None), owner, placement),
                node,
            )
        except (NodeGoingAway, Unreachable):
            node.distrust()
            # The agent may never have seen the job: it would not release the share.
            if placement is not None:
                await asyncio.to_thread(release_placement, placement)
            raise
        return status

    async def _place(self, job_id: str, spec: JobSpec) -> tuple[Node, str | None]:
        """Place the job. One pinned to a node the front does not know waits for a fresh
        look at the cluster (and for that node's greeting, if the look found it); one that
        no known node takes (none has joined yet) waits for one up to
        ``NODE_WAIT_SECONDS``, then is refused with UNAVAILABLE (retry later)."""
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        if spec.node is not None and not named(spec.node, builtins.list(self._nodes.values())):
            # A node that joined since the last look (and its agent, if it is being greeted).
            await self._discovery.await_nodes(deadline, spec.node)
        while True:
            try:
                return await self._placer.place(job_id, spec)
            except NoNode:
                if not await self._discovery.await_nodes(deadline):
                    raise

    # -- output ----------------------------------------------------------------------------

    def follow(
        self, job_id: str, offset: int = 0, follow: bool = True
    ) -> AsyncIterator[OutputChunk]:
        """Output of ``job_id`` from ``offset``, streamed from its node's agent port
        (:mod:`.outputport`). A failed connection is retried from the last offset; a lost
        node ends the stream with FAILED_PRECONDITION (its spool was on that node)."""
        job = self._table.lookup(job_id)
        if job.output_lost:
            raise output_lost(job, offset)

        def stream(at: int, follow: bool = True) -> AsyncIterator[OutputChunk]:
            return self._ports.follow(job, at, follow, lambda: self._closing)

        # Followers of one job share one stream from its node (:mod:`.fanout`).
        return self._fanout.follow(job_id, offset, stream) if follow else stream(offset, False)

    async def output_redirect(
        self, job_id: str, client_cert: bytes, client: str, max_streams: int | None
    ) -> Redirect | None:
        """Where ``client`` (admitted to read ``job_id``; ``client_cert`` its certificate)
        reads the job's output from its node's own port, with a ticket for it
        (:mod:`.outputport`, "Direct output"); None where the front relays it instead:
        direct output turned off, the node lost, or its agent not answering."""
        job = self._table.lookup(job_id)
        if self._client_ca is None or job.output_lost:
            return None
        grant = TicketGrant(job_id, client_cert, client, max_streams, self._client_ca)
        try:
            return await self._ports.redirect(job.node, grant)
        except Unreachable:
            return None

    async def _relay(self, job_id: str) -> None:
        """Feed ``output_chunk`` observers with a cluster job's output, as the local
        engine does."""
        try:
            async for chunk in self.follow(job_id):
                self._plugins.output_chunk(job_id, chunk.stream.label, chunk.data)
        except JobworkerError as err:
            log.warning("output_relay_ended", job_id=job_id, error=str(err))

    # -- usage -----------------------------------------------------------------------------

    async def usage(self, job_id: str, last: int = 0) -> JobUsage:
        """The job's samples, from its node's agent; for a job whose node was lost, those
        the front relayed before (FAILED_PRECONDITION if none)."""
        job = self._table.lookup(job_id)
        if not job.output_lost:
            try:
                usage: JobUsage = await call(job.node.agent.usage.remote(job_id, last), job.node)
            except Unreachable:
                if not job.output_lost:
                    raise
            else:
                self._table.keep_usage(job, usage)
                return usage
        return self._table.kept_usage(job, last)

    async def running_usage(self, last: int = 0) -> builtins.list[JobUsage]:
        """The samples of every running job of every node that answers within
        ``USAGE_LIST_TIMEOUT``; a node that does not is left out (and logged)."""
        found = await self._gather_usage(last)
        for job, usage in found:
            self._table.keep_usage(job, usage)
        return [usage for _, usage in found]

    async def _gather_usage(self, last: int) -> builtins.list[tuple[Job, JobUsage]]:
        """Every live node's running jobs' samples, each with its job, within
        ``USAGE_LIST_TIMEOUT``."""
        nodes = [n for n in self._nodes.values() if not n.lost]
        replies = await asyncio.gather(*(self._node_usage(n, last) for n in nodes))
        found = []
        for node, reply in zip(nodes, replies, strict=True):
            for usage in reply:
                job = self._table.find(usage.job_id)
                if job is not None and job.node is node:  # else started since the last poll
                    found.append((job, usage))
        return found

    async def _node_usage(self, node: Node, last: int) -> builtins.list[JobUsage]:
        try:
            usage: builtins.list[JobUsage] = await call(
                node.agent.running_usage.remote(last), node, USAGE_LIST_TIMEOUT
            )
        except Exception as err:
            log.warning("usage_node_skipped", node=node.name,
                        error=str(getattr(err, "error", err)) or type(err).__name__)  # fmt: skip
            return []
        return usage

    # -- stop ------------------------------------------------------------------------------

    async def write_input(self, job_id: str, chunks: AsyncIterator[InputChunk]) -> InputResult:
        """As :meth:`JobManager.write_input`, on the job's node, in pieces (:mod:`.stdin`)."""
        job = self._table.lookup(job_id)
        agent, node = job.node.agent, job.node
        session: int = await call(agent.input_begin.remote(job_id), node)
        ended: InputResult | None = None
        try:
            async for piece in pieces(chunks):
                ended = await call(agent.input_chunk.remote(session, piece), node)
                if ended is not None:
                    return ended
            last: InputResult = await call(agent.input_end.remote(session), node)
            ended = last
            return last
        finally:
            if ended is None:  # the client went away, or a call failed: give stdin back
                agent.input_end.remote(session)

    async def wait(self, job_id: str) -> JobStatus:
        job = self._table.lookup(job_id)
        await job.done.wait()
        return job.status

    async def stop(self, job_id: str, by: str, grace: float | None = None) -> StopResult:
        """As :meth:`JobManager.stop`, on the job's node (whose containment kills the tree)."""
        job = self._table.lookup(job_id)
        if grace is not None and not 0 <= grace <= 3600:
            raise InvalidArgument(f"grace {grace} must be between 0 and 3600 seconds")
        if job.done.is_set():
            status = job.status
            return StopResult(status, True, False, f"job already finished ({describe_end(status)})")
        grace = self.default_grace if grace is None else grace
        result: StopResult = await call(job.node.agent.stop.remote(job_id, by, grace), job.node)
        self._table.update(job, result.status)
        return result

    # -- shutdown --------------------------------------------------------------------------

    async def shutdown(self, grace: float | None = None) -> None:
        """Leave the cluster, stopping none of its jobs (whatever ``--live-restore`` says):
        the cluster's jobs outlive any one front server, since other front servers serve
        them too, and the next one finds them. The agents stay: they are the nodes'
        engines."""
        self._closing = True
        self._discovery.close()
        log.info("ray_jobs_left_running", running_jobs=self.running,
                 consequence="the jobs go on on their nodes; other front servers, and the"
                 " next one started, serve them")  # fmt: skip
        if self._reports:  # ends already seen: their records, and the ledger's slots
            await asyncio.wait(self._reports, timeout=CALL_TIMEOUT)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._ports.close()
        import ray

        await asyncio.to_thread(ray.shutdown)

"""The front server's engine for a Ray cluster: the job engine's surface over node agents.

Where things happen:

* on the front: authorization and its decision (the gRPC service), ``pre_spawn``,
  ``start_refused``, placement (:mod:`.placement`), and the relayed observers
  ``job_started``, ``output_chunk`` (only when a plugin wants it: the front then pulls every
  job's output) and ``on_exit`` -- so audit-log and third-party observers see cluster jobs
  as local ones;
* on the node (:mod:`.agent`): ``limits_apply`` and isolation, by the node-side plugins.

The front keeps an in-memory picture of every agent's jobs (:mod:`.table`), refreshed by a
long poll per node (:meth:`.agent.NodeAgent.poll`, at most ``POLL_SECONDS`` apart). A
failing poll asks the GCS whether the node is alive: once Ray declares it dead (its health
check, about 15 s by default) or the agent is gone, that node's running jobs end with
``node_lost``. A restarted front server rebuilds the picture by polling every agent.

Usage samples (:mod:`jobworker.usage`) are taken on the node by the agent's engine, as on a
single server. ``GetUsage`` asks the job's agent (bounded by ``CALL_TIMEOUT``, like every
agent call); ``ListUsage`` asks every live node's agent at once and leaves out, with a
warning in the log, a node that does not answer within ``USAGE_LIST_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import structlog

from jobworker.backends.ray.agent import (
    NAMESPACE,
    AgentConfig,
    NodeAgent,
    PollReply,
    ReadResult,
    agent_name,
    release_placement,
)
from jobworker.backends.ray.auth import UNAUTHENTICATED_RISK, check_cluster
from jobworker.backends.ray.nodes import Node, Unreachable, call
from jobworker.backends.ray.placement import NoNode, Placer, named
from jobworker.backends.ray.stdin import pieces
from jobworker.backends.ray.table import Job, JobTable
from jobworker.errors import (
    FailedPrecondition,
    InvalidArgument,
    JobworkerError,
    client_full,
    server_full,
)
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.model import (
    InputChunk,
    InputResult,
    JobStatus,
    OutputChunk,
    StopResult,
    Stream,
    describe_end,
    new_job_id,
)
from jobworker.usage import JobUsage, UsageSample

log = structlog.get_logger("jobworker.ray.front")

#: Longest wait of one agent long poll: the heartbeat period.
POLL_SECONDS = 1.0
#: How long one follower read waits on the node for new output before asking again.
FOLLOW_WAIT = 5.0
#: Bytes pulled from an agent per read (large pieces: each call costs a round trip).
READ_BYTES = 8 << 20
#: Pause before retrying a failed agent call (a follower resumes from its offset).
RETRY_SECONDS = 0.5
#: How often the front looks for nodes that joined the cluster.
DISCOVER_SECONDS = 5.0
#: How long a start waits for a node to take it when none has joined yet.
NODE_WAIT_SECONDS = 5.0
#: Longest wait for one node's running jobs' usage (``ListUsage``, what ``jobworker top``
#: asks every second): a node slower than that is left out of the answer.
USAGE_LIST_TIMEOUT = 5.0


def _join(address: str) -> None:
    """``ray.init`` as a driver of the cluster at ``address``, with SIGTERM left to the
    server.

    Called on the main thread, before the server serves (it blocks for about a second):
    there, Ray puts its own SIGTERM handler (exit at once) and, under it, a crash reporter
    that prints a C++ stack for every SIGTERM, so that a clean stop would look like a
    crash. SIGTERM goes back to the server's handler (stop the jobs, then exit); the
    crash reporter keeps the signals of real crashes.
    """
    import ray

    if ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()
    terminate = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    finally:
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)


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
        live_restore: bool = False,
    ) -> None:
        """``live_restore``: :meth:`shutdown` leaves the jobs running on their nodes."""
        self._plugins = plugins
        self._live_restore = live_restore
        self._agent_config = agent_config
        self.default_grace = default_grace
        self._max_running = max_running
        self._max_per_client = max_running_per_client or max_running
        #: Starts between admission and the agent's answer, per owner (counted in quotas).
        self._starting: collections.Counter[str] = collections.Counter()
        self._nodes: dict[str, Node] = {}
        self._table = JobTable(plugins)
        self._placer = Placer(self._nodes, placement_timeout)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._relay_output = plugins.has_impl("jobworker_output_chunk")
        #: Set to have the discovery loop look at once (a start waits for a node).
        self._wake = asyncio.Event()
        #: Set (and replaced) after each look at the cluster: starts waiting for a node.
        self._looked = asyncio.Event()
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
        (:meth:`_discover_forever`), so that the server answers at once at any cluster size.

        A cluster that does not authenticate is refused (see :func:`.auth.check_cluster`)
        unless ``allow_unauthenticated``."""

        backend = cls(plugins, agent_config, **kwargs)
        backend._authenticated = await check_cluster(
            address, allow_unauthenticated=backend._allow_unauthenticated
        )
        try:
            _join(address)
        except Exception as err:
            raise FailedPrecondition(f"cannot join the Ray cluster at {address}: {err}") from err
        # Discovery runs in the background: the server answers while agents start.
        backend._spawn(backend._discover_forever(), "ray-discover")
        return backend

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _discover_forever(self) -> None:
        """Look for new nodes at once, then every ``DISCOVER_SECONDS`` or when a start
        waits for a node (:meth:`_await_nodes`)."""
        first = True
        while not self._closing:
            try:
                await self._discover()
            except Exception:
                log.exception("ray_discover_failed")
            if first:
                log.info("ray_nodes_discovered", nodes=self.nodes)
                first = False
            looked, self._looked = self._looked, asyncio.Event()
            looked.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), DISCOVER_SECONDS)
            self._wake.clear()

    async def _await_nodes(self, deadline: float) -> bool:
        """Wait for the next look at the cluster, until ``deadline`` (monotonic); whether
        there is time left to try again."""
        looked = self._looked
        self._wake.set()
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(looked.wait(), left)
        return time.monotonic() < deadline

    async def _discover(self) -> None:
        """An agent on every alive node not known yet: all greeted at once."""
        import ray

        nodes = await asyncio.to_thread(ray.nodes)
        new = [n for n in nodes if n["Alive"] and n["NodeID"] not in self._nodes]
        await asyncio.gather(*(self._greet(info) for info in new))

    async def _greet(self, info: dict[str, Any]) -> None:
        """Start or find the agent of the node ``info`` describes; the node takes jobs once
        its agent answers."""
        node_id = info["NodeID"]
        name = info.get("NodeName") or info["NodeManagerAddress"]
        agent = self._agent_handle(node_id, name)
        node = Node(node_id, name, agent, dict(info["Resources"]))
        try:
            hello = await call(agent.hello.remote(), node)
            first: PollReply = await call(agent.poll.remote(-1, 0), node)  # its jobs, at once
        except JobworkerError as err:
            log.warning("agent_unavailable", node=name, error=str(getattr(err, "error", err)))
            return
        self._table.merge(node, first)
        self._nodes[node_id] = node
        log.info("node_joined", node=name, node_id=node_id, agent_pid=hello["pid"],
                 stale_jobs_killed=hello["swept"])  # fmt: skip
        node.watcher = self._spawn(self._watch(node, first.version), f"ray-watch-{name}")

    def _agent_handle(self, node_id: str, name: str) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote_agent = ray.remote(NodeAgent)
        return remote_agent.options(
            name=agent_name(node_id),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=0,
            max_concurrency=10_000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(attrs.evolve(self._agent_config, node_name=name))

    # -- the picture of every node's jobs ---------------------------------------------------

    async def _watch(self, node: Node, since: int) -> None:
        """Long-poll one agent (from version ``since``) until the node is lost or the
        backend closes."""
        import ray

        while not self._closing:
            try:
                reply: PollReply = await call(node.agent.poll.remote(since, POLL_SECONDS), node)
            except Unreachable as err:
                if isinstance(err.error, ray.exceptions.ActorDiedError) or not await self._alive(
                    node
                ):
                    del self._nodes[node.node_id]
                    self._table.lose(node, str(err.error))
                    return
                await asyncio.sleep(RETRY_SECONDS)
                continue
            since, node.heard_at = reply.version, time.monotonic()
            self._table.merge(node, reply)

    async def _alive(self, node: Node) -> bool:
        import ray

        nodes = await asyncio.to_thread(ray.nodes)
        return any(n["NodeID"] == node.node_id and n["Alive"] for n in nodes)

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
        plugin's per-job series): as fresh as the agents' heartbeats (:data:`POLL_SECONDS`)."""
        return self._table.latest_usage()

    @property
    def running(self) -> int:
        return self._table.running_count

    @property
    def nodes(self) -> builtins.list[str]:
        return sorted(node.name for node in self._nodes.values())

    # -- start -----------------------------------------------------------------------------

    async def start(self, spec: JobSpec, owner: str) -> JobStatus:
        """Place and start ``spec`` on a node; errors as :meth:`JobManager.start`, plus
        RESOURCE_EXHAUSTED when no node can take the job."""
        job_id = new_job_id()
        try:
            if self._closing:
                raise FailedPrecondition("the server is shutting down; retry on another server")
            if self.running + self._starting.total() >= self._max_running:
                raise server_full(self.running, self._max_running)
            active = self._table.running_of(owner) + self._starting[owner]
            if active >= self._max_per_client:
                raise client_full(owner, active, self._max_per_client)
            spec = self._plugins.pre_spawn(job_id, spec, owner)
            if not self._authenticated:
                log.warning("ray_cluster_unauthenticated", job_id=job_id,
                            consequence=UNAUTHENTICATED_RISK)  # fmt: skip
            self._starting[owner] += 1
            try:
                status, node = await self._launch(job_id, spec, owner)
            finally:
                self._starting[owner] -= 1
        except JobworkerError as err:
            log.info("job_refused", job_id=job_id, owner=owner, code=err.code, error=str(err))
            self._plugins.start_refused(job_id, spec, owner, err)
            raise
        self._table.add(status, node)
        log.info("job_started", job_id=job_id, owner=owner, command=spec.command,
                 node=node.name, pid=status.pid)  # fmt: skip
        self._plugins.job_started(status)
        if self._relay_output:
            self._spawn(self._relay(job_id), f"ray-relay-{job_id}")
        return status

    async def _launch(self, job_id: str, spec: JobSpec, owner: str) -> tuple[JobStatus, Node]:
        """Place the job and have its node's agent start it."""
        node, placement = await self._place(job_id, spec)
        try:
            status: JobStatus = await call(
                node.agent.start.remote(job_id, attrs.evolve(spec, node=None), owner, placement),
                node,
            )
        except Unreachable:
            # The agent may never have seen the job: it would not release the share.
            if placement is not None:
                await asyncio.to_thread(release_placement, placement)
            raise
        return status, node

    async def _place(self, job_id: str, spec: JobSpec) -> tuple[Node, str | None]:
        """Place the job. One pinned to a node the front does not know waits for a fresh
        look at the cluster; one that no known node takes (none has joined yet) waits for
        one up to ``NODE_WAIT_SECONDS``, then is refused with UNAVAILABLE (retry later)."""
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        if spec.node is not None and not named(spec.node, builtins.list(self._nodes.values())):
            await self._await_nodes(deadline)  # a node that joined since the last look
        while True:
            try:
                return await self._placer.place(job_id, spec)
            except NoNode:
                if not await self._await_nodes(deadline):
                    raise

    # -- output ----------------------------------------------------------------------------

    def follow(
        self, job_id: str, offset: int = 0, follow: bool = True
    ) -> AsyncIterator[OutputChunk]:
        """Output of ``job_id`` from ``offset``, pulled from its node's agent. A transient
        agent error is retried from the last offset; a lost node ends the stream with
        FAILED_PRECONDITION (its spool was on that node)."""
        job = self._table.lookup(job_id)
        if job.output_lost:
            self._raise_lost(job, offset)
        return self._follow(job, offset, follow)

    def _raise_lost(self, job: Job, offset: int) -> None:
        raise FailedPrecondition(
            f"job {job.status.job_id} ran on node {job.node.name}, which was lost with the"
            f" job's spooled output; the stream ends at offset {offset}"
        )

    async def _follow(self, job: Job, offset: int, follow: bool) -> AsyncIterator[OutputChunk]:
        agent, job_id = job.node.agent, job.status.job_id
        while True:
            try:
                result: ReadResult = await call(
                    agent.read.remote(job_id, offset, READ_BYTES, FOLLOW_WAIT, follow), job.node
                )
            except Unreachable:
                if job.output_lost:
                    self._raise_lost(job, offset)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            for tag, data, after in result.chunks:
                yield OutputChunk(Stream(tag), data, after)
                offset = after
            if result.at_end:
                if follow:
                    # The end of a followed stream means the job is over: its status
                    # says so before the follower hears of the end (the agent's poll
                    # reports the exit at once).
                    await job.done.wait()
                return

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
        nodes = [n for n in self._nodes.values() if not n.lost]
        replies = await asyncio.gather(*(self._node_usage(n, last) for n in nodes))
        found = []
        for node, reply in zip(nodes, replies, strict=True):
            for usage in reply:
                job = self._table.find(usage.job_id)
                if job is None or job.node is not node:
                    continue  # started after the front's last look at the node
                self._table.keep_usage(job, usage)
                found.append(usage)
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
        """Stop every running job (the local semantics of SIGTERM; none with
        ``live_restore``), then leave the cluster. The agents stay: they are the nodes'
        engines, ready for the next front server."""
        self._closing = True
        running = [] if self._live_restore else self._table.running()
        results = await asyncio.gather(
            *(self.stop(j.status.job_id, by="server-shutdown", grace=grace) for j in running),
            return_exceptions=True,
        )
        for job, result in zip(running, results, strict=True):
            if isinstance(result, BaseException):
                log.error("job_stop_failed", job_id=job.status.job_id, error=str(result))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        import ray

        await asyncio.to_thread(ray.shutdown)

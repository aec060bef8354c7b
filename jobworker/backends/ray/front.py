"""The front server's engine for a Ray cluster: the job engine's surface over node agents.

Where things happen:

* on the front: authorization and its decision (the gRPC service), ``pre_spawn``,
  ``start_refused``, placement, and the relayed observers ``job_started``,
  ``output_chunk`` (only when a plugin wants it: the front then pulls every job's output)
  and ``on_exit`` -- so audit-log and third-party observers see cluster jobs as local ones;
* on the node (:mod:`.agent`): ``limits_apply`` and isolation, by the node-side plugins.

A job is placed from its limits: ``cpu`` and ``memory`` become a one-bundle placement
group (Ray's bookkeeping: limits are enforced on the node by its containment plugin),
released by the agent when the job ends. ``spec.node`` pins the bundle to a node. An ask no
node could ever hold is refused at once; one that does not fit now is refused after
``placement_timeout`` (Ray would leave it pending forever). Both are RESOURCE_EXHAUSTED,
naming the ask and the largest node.

The front keeps an in-memory picture of every agent's jobs, refreshed by a long poll per
node (:meth:`.agent.NodeAgent.poll`, at most ``POLL_SECONDS`` apart): a job's exit is
seen at once; ``output_bytes`` of a running job may lag by up to that much. A failing poll
asks the GCS whether the node is alive: once Ray declares it dead (its health check, about
15 s by default) or the agent is gone, that node's running jobs end with ``node_lost``.
A restarted front server rebuilds the picture by polling every agent.

Usage samples (:mod:`jobworker.usage`) are taken on the node by the agent's engine, as on a
single server. ``GetUsage`` asks the job's agent (bounded by ``CALL_TIMEOUT``, like every
agent call); ``ListUsage`` asks every live node's agent at once and leaves out, with a
warning in the log, a node that does not answer within ``USAGE_LIST_TIMEOUT``. The front
keeps the samples it relayed of each running job (a :class:`~jobworker.usage.UsageRing`,
at most ``RING_SIZE`` samples), so that the usage of a job whose node is lost can still be
read up to the last sample relayed; they are dropped when the job ends on a live node (its
agent keeps its own).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

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
from jobworker.errors import (
    FailedPrecondition,
    InvalidArgument,
    JobworkerError,
    ResourceExhausted,
    job_not_found,
)
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.model import (
    ExitInfo,
    InputChunk,
    InputResult,
    JobState,
    JobStatus,
    OutputChunk,
    StopResult,
    Stream,
    TerminationReason,
    describe_end,
    new_job_id,
)
from jobworker.usage import JobUsage, UsageRing, UsageSample

log = structlog.get_logger("jobworker.ray.front")

#: Longest wait of one agent long poll: the heartbeat period.
POLL_SECONDS = 1.0
#: A call to an agent that takes longer than this is treated as a failed call.
CALL_TIMEOUT = 30.0
#: How long one follower read waits on the node for new output before asking again.
FOLLOW_WAIT = 5.0
#: Bytes pulled from an agent per read (large pieces: each call costs a round trip).
READ_BYTES = 8 << 20
#: Pause before retrying a failed agent call (a follower resumes from its offset).
RETRY_SECONDS = 0.5
#: How often the front looks for nodes that joined the cluster.
DISCOVER_SECONDS = 5.0
#: Longest wait for one node's running jobs' usage (``ListUsage``, what ``jobworker top``
#: asks every second): a node slower than that is left out of the answer.
USAGE_LIST_TIMEOUT = 5.0

_T = TypeVar("_T")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def describe_ask(ask: dict[str, float]) -> str:
    parts = []
    if "CPU" in ask:
        parts.append(f"{ask['CPU']:g} CPU")
    if "memory" in ask:
        parts.append(f"{_gib(ask['memory'])} memory")
    return ", ".join(parts)


_NO_STDIN = (
    "the Ray cluster backend does not forward stdin yet: start the job without -i, or on a"
    " single jobworker server"
)


@attrs.define(eq=False)
class _Node:
    node_id: str
    name: str
    agent: Any  # a Ray actor handle
    total: dict[str, float]
    lost: bool = False
    watcher: asyncio.Task[None] | None = None

    def describe(self) -> str:
        cpu = self.total.get("CPU", 0)
        return f"{self.name} ({cpu:g} CPU, {_gib(self.total.get('memory', 0))} memory)"


@attrs.define(eq=False)
class _KeptUsage:
    """The samples of a running job the front relayed from its agent, newest kept on."""

    source: str
    ring: UsageRing = attrs.Factory(UsageRing)

    def add(self, usage: JobUsage) -> None:
        if usage.source:
            self.source = usage.source
        newest = self.ring.latest
        for sample in usage.samples:  # oldest first
            if newest is None or sample.time > newest.time:
                self.ring.add(sample)


@attrs.define(eq=False)
class _Job:
    status: JobStatus
    node: _Node
    done: asyncio.Event = attrs.Factory(asyncio.Event)
    output_lost: bool = False
    usage: _KeptUsage | None = None
    #: The newest sample its agent's heartbeat carried (running jobs; kept once it ends).
    newest_usage: UsageSample | None = None


async def _call(ref: Awaitable[_T], node: _Node, within: float = CALL_TIMEOUT) -> _T:
    """Await an agent call; an error the agent raised is re-raised as itself."""
    import ray

    try:
        return await asyncio.wait_for(ref, within)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause
        if isinstance(cause, JobworkerError):
            raise cause from None
        raise
    except (ray.exceptions.RayError, TimeoutError) as err:
        raise _Unreachable(node, err) from err


class _Unreachable(FailedPrecondition):
    def __init__(self, node: _Node, err: BaseException) -> None:
        super().__init__(f"node {node.name} is unreachable ({type(err).__name__}); retry")
        self.node = node
        self.error = err


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
    ) -> None:
        self._plugins = plugins
        self._agent_config = agent_config
        self._placement_timeout = placement_timeout
        self.default_grace = default_grace
        self._max_running = max_running
        self._nodes: dict[str, _Node] = {}
        self._jobs: dict[str, _Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._relay_output = plugins.has_impl("jobworker_output_chunk")
        self._discovering = asyncio.Lock()

    # -- connection ------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, address: str, plugins: Plugins, agent_config: AgentConfig, **kwargs: Any
    ) -> RayBackend:
        """Join the cluster at ``address`` (the head's GCS ``HOST:PORT``) as a driver, start
        or find an agent on every alive node, and learn the jobs they run."""
        import ray

        def init() -> None:
            if not ray.is_initialized():
                ray.init(
                    address=address,
                    namespace=NAMESPACE,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    configure_logging=False,
                )

        try:
            await asyncio.to_thread(init)
        except Exception as err:
            raise FailedPrecondition(f"cannot join the Ray cluster at {address}: {err}") from err
        backend = cls(plugins, agent_config, **kwargs)
        await backend._discover()
        backend._spawn(backend._discover_forever(), "ray-discover")
        return backend

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _discover_forever(self) -> None:
        while not self._closing:
            await asyncio.sleep(DISCOVER_SECONDS)
            try:
                await self._discover()
            except Exception:
                log.exception("ray_discover_failed")

    async def _discover(self) -> None:
        """An agent on every alive node not known yet (one look at a time)."""
        async with self._discovering:
            await self._discover_once()

    async def _discover_once(self) -> None:
        import ray

        nodes = await asyncio.to_thread(ray.nodes)
        for info in nodes:
            node_id = info["NodeID"]
            if not info["Alive"] or node_id in self._nodes:
                continue
            name = info.get("NodeName") or info["NodeManagerAddress"]
            agent = self._agent_handle(node_id, name)
            node = _Node(node_id, name, agent, dict(info["Resources"]))
            try:
                hello = await _call(agent.hello.remote(), node)
            except JobworkerError as err:
                log.warning("agent_unavailable", node=name, error=str(getattr(err, "error", err)))
                continue
            self._nodes[node_id] = node
            log.info("node_joined", node=name, node_id=node_id, agent_pid=hello["pid"],
                     stale_jobs_killed=hello["swept"])  # fmt: skip
            node.watcher = self._spawn(self._watch(node), f"ray-watch-{name}")

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

    async def _watch(self, node: _Node) -> None:
        """Long-poll one agent until the node is lost or the backend closes."""
        import ray

        since = -1
        while not self._closing:
            try:
                reply: PollReply = await _call(node.agent.poll.remote(since, POLL_SECONDS), node)
            except _Unreachable as err:
                if isinstance(err.error, ray.exceptions.ActorDiedError) or not await self._alive(
                    node
                ):
                    self._lose(node, str(err.error))
                    return
                await asyncio.sleep(RETRY_SECONDS)
                continue
            since = reply.version
            self._merge(node, reply)

    async def _alive(self, node: _Node) -> bool:
        import ray

        nodes = await asyncio.to_thread(ray.nodes)
        return any(n["NodeID"] == node.node_id and n["Alive"] for n in nodes)

    def _merge(self, node: _Node, reply: PollReply) -> None:
        for status in reply.jobs:
            job = self._jobs.get(status.job_id)
            if job is None:  # started by an earlier front server
                job = self._jobs[status.job_id] = _Job(status, node)
                if status.state is JobState.EXITED:
                    job.done.set()
                else:
                    log.info("job_recovered", job_id=status.job_id, node=node.name,
                             owner=status.owner)  # fmt: skip
                continue
            self._update(job, status)
        for job_id in reply.evicted:
            job = self._jobs.get(job_id)
            if job is not None and job.node is node and job.done.is_set():
                del self._jobs[job_id]
        for job_id, sample in reply.usage.items():
            job = self._jobs.get(job_id)
            if job is not None and job.node is node:
                job.newest_usage = sample

    def _update(self, job: _Job, status: JobStatus) -> None:
        if job.done.is_set():
            return
        job.status = status
        if status.state is JobState.EXITED:
            job.usage = None  # the agent keeps the samples with the job
            self._ended(job)

    def _ended(self, job: _Job) -> None:
        job.done.set()
        status = job.status
        assert status.exit is not None
        log.info(
            "job_exited",
            job_id=status.job_id,
            node=job.node.name,
            reason=status.exit.reason.value,
            exit_code=status.exit.exit_code,
            signal=status.exit.signal,
        )
        self._plugins.on_exit(status)

    def _lose(self, node: _Node, why: str) -> None:
        node.lost = True
        del self._nodes[node.node_id]
        lost = [j for j in self._jobs.values() if j.node is node and not j.done.is_set()]
        log.error("node_lost", node=node.name, node_id=node.node_id, error=why,
                  running_jobs=[j.status.job_id for j in lost])  # fmt: skip
        now = time.time()
        for job in lost:
            job.output_lost = True
            job.status = attrs.evolve(
                job.status,
                state=JobState.EXITED,
                ended_at=now,
                exit=ExitInfo(reason=TerminationReason.NODE_LOST),
            )
            self._ended(job)

    # -- queries ---------------------------------------------------------------------------

    def find(self, job_id: str) -> JobStatus | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.status

    def get(self, job_id: str) -> JobStatus:
        return self._lookup(job_id).status

    def list(self) -> list[JobStatus]:
        return [job.status for job in self._jobs.values()]

    def _lookup(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise job_not_found(job_id)
        return job

    def latest_usage(self) -> builtins.list[tuple[JobStatus, UsageSample]]:
        """The newest sample of every job still kept, with its status (the metrics
        plugin's per-job series): as fresh as the agents' heartbeats (:data:`POLL_SECONDS`)."""
        # Called from the metrics server's thread: list() copies the values in one step
        # (no Python code runs meanwhile), so the loop adding a job cannot break it.
        return [(j.status, j.newest_usage) for j in list(self._jobs.values()) if j.newest_usage]

    @property
    def running(self) -> int:
        return sum(1 for job in self._jobs.values() if not job.done.is_set())

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
            if spec.stdin:
                raise FailedPrecondition(_NO_STDIN)
            if self.running >= self._max_running:
                raise ResourceExhausted(
                    f"{self.running} jobs are running, the most this server allows"
                    f" ({self._max_running}); stop some or wait for them to finish"
                )
            spec = self._plugins.pre_spawn(job_id, spec, owner)
            node, placement = await self._place(job_id, spec)
            try:
                status: JobStatus = await _call(
                    node.agent.start.remote(
                        job_id, attrs.evolve(spec, node=None), owner, placement
                    ),
                    node,
                )
            except _Unreachable:
                # The agent may never have seen the job: it would not release the share.
                if placement is not None:
                    await asyncio.to_thread(release_placement, placement)
                raise
        except JobworkerError as err:
            log.info("job_refused", job_id=job_id, owner=owner, code=err.code, error=str(err))
            self._plugins.start_refused(job_id, spec, owner, err)
            raise
        self._jobs[job_id] = _Job(status, node)
        log.info("job_started", job_id=job_id, owner=owner, command=spec.command,
                 node=node.name, pid=status.pid)  # fmt: skip
        self._plugins.job_started(status)
        if self._relay_output:
            self._spawn(self._relay(job_id), f"ray-relay-{job_id}")
        return status

    def _named(self, name: str, node: _Node | None = None) -> bool:
        candidates = [node] if node is not None else self._nodes.values()
        return any(name in (n.name, n.node_id) and not n.lost for n in candidates)

    async def _place(self, job_id: str, spec: JobSpec) -> tuple[_Node, str | None]:
        """The node for ``spec`` and the name of the placement group holding its share."""
        if spec.node is not None and not self._named(spec.node):
            await self._discover()  # a node that joined since the last look
        nodes = [n for n in self._nodes.values() if not n.lost]
        if spec.node is not None:
            pinned = [n for n in nodes if self._named(spec.node, n)]
            if not pinned:
                names = ", ".join(sorted(n.name for n in nodes)) or "none"
                raise InvalidArgument(f"no node named {spec.node!r}; nodes: {names}")
            nodes = pinned
        if not nodes:
            raise FailedPrecondition("no node of the Ray cluster is available; retry later")
        ask: dict[str, float] = {}
        if spec.limits.cpu:
            ask["CPU"] = spec.limits.cpu
        if spec.limits.memory:
            ask["memory"] = float(spec.limits.memory)
        if not ask:
            load = {n.node_id: 0 for n in nodes}
            for job in self._jobs.values():
                if not job.done.is_set() and job.node.node_id in load:
                    load[job.node.node_id] += 1
            return min(nodes, key=lambda n: (load[n.node_id], -n.total.get("CPU", 0))), None
        largest = max(self._nodes.values(), key=lambda n: (n.total.get("CPU", 0),
                                                           n.total.get("memory", 0)))  # fmt: skip
        fits = [n for n in nodes if all(n.total.get(k, 0) >= v for k, v in ask.items())]
        if not fits:
            where = f"node {nodes[0].name}" if spec.node else "any node"
            raise ResourceExhausted(
                f"{describe_ask(ask)} asked for, more than {where} has:"
                f" the largest node is {largest.describe()}"
            )
        return await self._reserve(job_id, ask, fits, pinned=spec.node is not None)

    async def _reserve(
        self, job_id: str, ask: dict[str, float], fits: builtins.list[_Node], pinned: bool
    ) -> tuple[_Node, str]:
        from ray.util import placement_group, placement_group_table, remove_placement_group

        name = f"jobworker-{job_id}"
        selector = [{"ray.io/node-id": fits[0].node_id}] if pinned else None
        group = placement_group(
            [ask], strategy="STRICT_PACK", name=name, lifetime="detached",
            bundle_label_selector=selector,
        )  # fmt: skip
        try:
            await asyncio.wait_for(group.ready(), self._placement_timeout)
        except TimeoutError:
            remove_placement_group(group)
            free = ", ".join(n.describe() for n in fits)
            raise ResourceExhausted(
                f"{describe_ask(ask)} asked for: no node that could hold it ({free}) has it"
                f" free now (waited {self._placement_timeout:g} s); retry later"
            ) from None
        except BaseException:
            remove_placement_group(group)
            raise
        table = await asyncio.to_thread(placement_group_table, group)
        node_id = table["bundles_to_node_id"][0]
        node = self._nodes.get(node_id)
        if node is None:
            remove_placement_group(group)
            raise FailedPrecondition("the node chosen for the job has no agent yet; retry")
        return node, name

    # -- output ----------------------------------------------------------------------------

    def follow(
        self, job_id: str, offset: int = 0, follow: bool = True
    ) -> AsyncIterator[OutputChunk]:
        """Output of ``job_id`` from ``offset``, pulled from its node's agent. A transient
        agent error is retried from the last offset; a lost node ends the stream with
        FAILED_PRECONDITION (its spool was on that node)."""
        job = self._lookup(job_id)
        if job.output_lost:
            self._raise_lost(job, offset)
        return self._follow(job, offset, follow)

    def _raise_lost(self, job: _Job, offset: int) -> None:
        raise FailedPrecondition(
            f"job {job.status.job_id} ran on node {job.node.name}, which was lost with the"
            f" job's spooled output; the stream ends at offset {offset}"
        )

    async def _follow(self, job: _Job, offset: int, follow: bool) -> AsyncIterator[OutputChunk]:
        agent, job_id = job.node.agent, job.status.job_id
        while True:
            try:
                result: ReadResult = await _call(
                    agent.read.remote(job_id, offset, READ_BYTES, FOLLOW_WAIT, follow), job.node
                )
            except _Unreachable:
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
        job = self._lookup(job_id)
        if not job.output_lost:
            try:
                usage: JobUsage = await _call(job.node.agent.usage.remote(job_id, last), job.node)
            except _Unreachable:
                if not job.output_lost:
                    raise
            else:
                self._keep_usage(job, usage)
                return usage
        return self._kept_usage(job, last)

    async def running_usage(self, last: int = 0) -> builtins.list[JobUsage]:
        """The samples of every running job of every node that answers within
        ``USAGE_LIST_TIMEOUT``; a node that does not is left out (and logged)."""
        nodes = [n for n in self._nodes.values() if not n.lost]
        replies = await asyncio.gather(*(self._node_usage(n, last) for n in nodes))
        found = []
        for node, reply in zip(nodes, replies, strict=True):
            for usage in reply:
                job = self._jobs.get(usage.job_id)
                if job is None or job.node is not node:
                    continue  # started after the front's last look at the node
                self._keep_usage(job, usage)
                found.append(usage)
        return found

    async def _node_usage(self, node: _Node, last: int) -> builtins.list[JobUsage]:
        try:
            usage: builtins.list[JobUsage] = await _call(
                node.agent.running_usage.remote(last), node, USAGE_LIST_TIMEOUT
            )
        except Exception as err:
            log.warning("usage_node_skipped", node=node.name,
                        error=str(getattr(err, "error", err)) or type(err).__name__)  # fmt: skip
            return []
        return usage

    def _keep_usage(self, job: _Job, usage: JobUsage) -> None:
        if job.done.is_set():
            return
        if job.usage is None:
            job.usage = _KeptUsage(usage.source)
        job.usage.add(usage)

    def _kept_usage(self, job: _Job, last: int) -> JobUsage:
        kept = job.usage
        if kept is None or not len(kept.ring):
            raise FailedPrecondition(
                f"job {job.status.job_id} ran on node {job.node.name}, which was lost with the"
                " job's usage samples (the front server had relayed none)"
            )
        return JobUsage(job.status.job_id, kept.source, kept.ring.samples(last))

    # -- stop ------------------------------------------------------------------------------

    async def write_input(self, job_id: str, chunks: AsyncIterator[InputChunk]) -> InputResult:
        """Not yet on a cluster: its jobs start with stdin closed (see :meth:`start`)."""
        self._lookup(job_id)  # NOT_FOUND first, as on a single server
        raise FailedPrecondition(_NO_STDIN)

    async def wait(self, job_id: str) -> JobStatus:
        job = self._lookup(job_id)
        await job.done.wait()
        return job.status

    async def stop(self, job_id: str, by: str, grace: float | None = None) -> StopResult:
        """As :meth:`JobManager.stop`, on the job's node (whose containment kills the tree)."""
        job = self._lookup(job_id)
        if grace is not None and not 0 <= grace <= 3600:
            raise InvalidArgument(f"grace {grace} must be between 0 and 3600 seconds")
        if job.done.is_set():
            status = job.status
            return StopResult(status, True, False, f"job already finished ({describe_end(status)})")
        grace = self.default_grace if grace is None else grace
        result: StopResult = await _call(job.node.agent.stop.remote(job_id, by, grace), job.node)
        self._update(job, result.status)
        return result

    # -- shutdown --------------------------------------------------------------------------

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop every running job (the local semantics of SIGTERM), then leave the cluster.
        The agents stay: they are the nodes' engines, ready for the next front server."""
        self._closing = True
        running = [j for j in self._jobs.values() if not j.done.is_set()]
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

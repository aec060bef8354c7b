"""The node agent: one Ray actor per node running jobworker's own engine on that node.

The front server creates it detached (it outlives the front server), pinned to its node
(``NodeAffinitySchedulingStrategy(soft=False)``) and asking for no CPU, so it never takes
a job's share of the node. It owns a local :class:`~jobworker.backends.local.manager.JobManager`:
jobs are
spawned, contained (the node-side plugins, e.g. cgroupv2, or :class:`.tree.ProcessTree`),
spooled and stopped exactly as on a single server.

The agent is the source of truth about its jobs: a restarted front server learns what runs
by asking (:meth:`NodeAgent.poll`), so the front keeps no state of its own on disk. Its
jobs die with it, or with its raylet (:mod:`.guard`).

Reports carry only changes, numbered by one version per agent so that any number of
pollers (fronts) each ask from where they are: a job's start and end, its output's byte
counts when they grew (looked at every ``OUTPUT_TICK``), and the jobs evicted. A poll
waits until there is a change or its ``wait`` passes; an idle node's answer is a version
number and two empty lists. Usage samples travel only when asked for (:meth:`usage`,
:meth:`running_usage`).

What a job on the node must not see, beyond what the isolation plugin hides on a single
server: the node's spool (``--ray-spool-dir``, not the front's ``--spool-dir``), Ray's
token file and Ray's temp directory (logs, and the unix sockets of the raylet and the
object store). The agent adds these to the plugin's hidden paths, and the cluster's own
addresses (the GCS's, every node's it knows at start) to the networks a job's private
network may not reach (``--job-network-deny``).

A node whose raylet has exited is leaving the cluster (its guard kills its jobs within
milliseconds; Ray declares it dead only after its health check, about 15 s): from then on
the agent starts nothing and reports nothing, it raises :class:`NodeGoingAway`. A start
checks before it spawns and again once the job runs, so that a start answered OK ran
while its raylet lived.

A job's stdin (:meth:`NodeAgent.input_begin`) is the local engine's, fed by the front
(:mod:`.stdin`); its output leaves by the agent's own port (:meth:`NodeAgent.output_port`,
:mod:`.outputport`), not through Ray.

Calls are plain values (attrs objects of :mod:`jobworker.model` and
:mod:`jobworker.usage`, pickled by Ray); errors are
:class:`~jobworker.errors.JobworkerError` raised through Ray, re-raised by the front.
Plain class here; the front wraps it with ``ray.remote`` so that importing this module
needs no Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import select
from pathlib import Path
from typing import Any

import attrs
import structlog

from jobworker.api.codec import Redirect
from jobworker.backends.local.manager import JobManager
from jobworker.backends.local.spool import spool_run
from jobworker.backends.ray.agentport import AgentPort
from jobworker.backends.ray.guard import start_guard
from jobworker.backends.ray.outputport import PortInfo, TicketGrant
from jobworker.backends.ray.stdin import INPUT_IDLE_SECONDS, InputSession
from jobworker.backends.ray.tree import ProcessTree, ProcRecords
from jobworker.errors import FailedPrecondition, Unavailable
from jobworker.hooks import hookimpl
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.model import InputChunk, InputResult, JobState, JobStatus, StopResult
from jobworker.usage import JobUsage

log = structlog.get_logger("jobworker.ray.agent")

NAMESPACE = "jobworker"
#: How often the agent looks for running jobs' output that grew (a change pollers hear):
#: the lag of ``output_bytes`` on the front.
OUTPUT_TICK = 1.0
#: Every this many ticks it drops jobs past retention (reported as evicted).
EVICT_TICKS = 10
#: Evictions remembered for pollers behind (a front whose polls failed for a while): a
#: poller further behind keeps some finished jobs listed until it restarts.
EVICTIONS_KEPT = 10_000


def agent_name(node_id: str) -> str:
    """The detached actor's name: one agent per Ray node id."""
    return f"jobworker-agent-{node_id}"


class NodeGoingAway(Unavailable):
    """The node's raylet has exited: the job was not started (or is being killed with the
    node's other jobs); the front places an unpinned one elsewhere."""


@attrs.frozen
class AgentConfig:
    """What every agent is told by the front server."""

    node_name: str
    #: Node-side plugins (containment, isolation) and the serve options they read.
    plugins: tuple[str, ...] = ()
    options: dict[str, Any] = attrs.field(factory=dict)
    spool_root: str | None = None
    default_grace: float = 10.0
    max_running: int = 1000
    retain_finished: int = 1000
    retain_seconds: float = 3600.0


@attrs.frozen
class PollReply:
    """Jobs that changed (with the agent's version after them) and ids no longer kept."""

    version: int
    jobs: list[JobStatus]
    evicted: list[str] = attrs.field(factory=list)


class _Events:
    """The agent's own observer: bumps the version the front long-polls on."""

    def __init__(self, agent: NodeAgent) -> None:
        self._agent = agent

    @hookimpl
    def jobworker_job_started(self, status: JobStatus) -> None:
        self._agent._output_seen[status.job_id] = _output_counts(status)
        self._agent._changed(status.job_id)

    @hookimpl
    def jobworker_on_exit(self, status: JobStatus) -> None:
        self._agent._job_over(status.job_id)


class _TreeFallback:
    """Containment for nodes without a cgroup plugin. CPU and memory were placement asks on
    the front; without a plugin nothing enforces them (status shows no applied limits)."""

    @hookimpl
    def jobworker_limits_apply(self, job_id: str, spec: JobSpec) -> ProcessTree:
        return ProcessTree()


def ray_private_paths() -> list[str]:
    """This node's Ray files a job must not see: the token file and Ray's temp directory."""
    import ray

    paths = [os.environ.get("RAY_AUTH_TOKEN_PATH", ""), str(Path.home() / ".ray")]
    node = ray._private.worker.global_worker.node
    if node is not None:
        paths.append(node.get_temp_dir_path())
    return [p for p in paths if p and os.path.exists(p)]


def ray_addresses() -> list[str]:
    """The cluster's addresses a job must not reach: the GCS's and every node's known now
    (a node that joins later is covered by the operator's ``--job-network-deny CIDR``)."""
    import ray

    node = ray._private.worker.global_worker.node
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call, unused-ignore]  # typed only with ray installed
    found = {info["NodeManagerAddress"] for info in nodes}
    if node is not None:
        found.add(node.gcs_address.rsplit(":", 1)[0])
    return sorted(found)


def _output_counts(status: JobStatus) -> tuple[int, int, bool]:
    """What of a running job's status grows: a change to report when it did."""
    return status.output_bytes, status.output_kept_bytes, status.output_truncated


def _raylet_pid() -> int | None:
    """The raylet this worker serves: its parent, which started it."""
    parent = os.getppid()
    try:
        is_raylet = Path(f"/proc/{parent}/comm").read_text().strip() == "raylet"
    except OSError:
        return None
    return parent if is_raylet else None


class NodeAgent:
    """Runs on one node; every method runs on the actor's event loop."""

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._manager: JobManager | None = None
        self._plugins: Plugins | None = None
        self._stack = contextlib.ExitStack()
        self._version = 0
        self._wakeup: asyncio.Event | None = None
        self._placements: dict[str, str] = {}
        self._records: ProcRecords | None = None
        self._swept: list[str] = []
        #: The version at which each retained job last changed (started, output grew,
        #: ended), in the order of those versions (a poll reads only the newest).
        self._changed_at: dict[str, int] = {}
        #: Evicted job ids and the version of their eviction, in that order.
        self._evicted: dict[str, int] = {}
        #: Running jobs' output counts as last reported.
        self._output_seen: dict[str, tuple[int, int, bool]] = {}
        self._ticker: asyncio.Task[None] | None = None
        #: A pidfd of the node's raylet (None: not found): readable once it exited.
        self._raylet: int | None = None
        #: Jobs whose start has not answered yet: no poll reports them before it does.
        self._starting: set[str] = set()
        self._inputs: dict[int, InputSession] = {}
        self._next_input = 0
        self._port: AgentPort | None = None

    # -- set-up ---------------------------------------------------------------------------

    def _ready(self) -> JobManager:
        """Build the engine on first use, on the actor's own event loop."""
        if self._manager is not None:
            return self._manager
        config = self._config
        plugins = Plugins()
        plugins.load(config.plugins)
        if not plugins.has_impl("jobworker_limits_apply"):
            plugins.register(_TreeFallback(), name="process-tree")
        plugins.register(_Events(self), name="ray-agent-events")
        options = dict(config.options, spool_dir=config.spool_root)
        options["isolation_hide"] = [*(options.get("isolation_hide") or ()), *ray_private_paths()]
        options["job_network_deny"] = [*(options.get("job_network_deny") or ()), *ray_addresses()]
        plugins.configure(argparse.Namespace(**options))
        root = Path(config.spool_root) if config.spool_root else None
        spool_dir = self._stack.enter_context(spool_run(root))
        self._records = ProcRecords(spool_dir.parent / f"agent-{config.node_name}-procs")
        self._swept = self._records.sweep()
        if self._swept:
            log.warning("stale_jobs_killed", node=config.node_name, jobs=self._swept)
        raylet = _raylet_pid()
        if raylet is None:
            log.warning("raylet_not_found", node=config.node_name,
                        consequence="jobs die with the agent, not with the raylet")  # fmt: skip
        start_guard(self._records.directory, os.getpid(), raylet or os.getpid())
        if raylet is not None:
            self._raylet = os.pidfd_open(raylet)
        self._plugins = plugins
        self._wakeup = asyncio.Event()
        self._manager = JobManager(
            plugins,
            spool_dir,
            default_grace=config.default_grace,
            max_running=config.max_running,
            retain_finished=config.retain_finished,
            retain_seconds=config.retain_seconds,
        )
        self._ticker = asyncio.get_running_loop().create_task(self._tick(self._manager))
        log.info("agent_ready", node=config.node_name, pid=os.getpid(), spool_dir=str(spool_dir))
        return self._manager

    def _changed(self, job_id: str) -> None:
        self._version += 1
        self._changed_at.pop(job_id, None)  # re-inserted last: the dict stays in version order
        self._changed_at[job_id] = self._version
        if self._wakeup is not None:
            self._wakeup.set()

    async def _tick(self, manager: JobManager) -> None:
        """Turn what grows without an event (output, retention's evictions) into changes."""
        ticks = 0
        while True:
            await asyncio.sleep(OUTPUT_TICK)
            for job_id, seen in list(self._output_seen.items()):
                status = manager.find(job_id)
                if status is not None and _output_counts(status) != seen:
                    self._output_seen[job_id] = _output_counts(status)
                    self._changed(job_id)
            ticks += 1
            if ticks % EVICT_TICKS == 0:
                self._evict(manager)

    def _evict(self, manager: JobManager) -> None:
        present = {s.job_id for s in manager.list()}  # list() evicts per the retention bounds
        gone = [j for j in self._changed_at if j not in present]
        for job_id in gone:
            del self._changed_at[job_id]
            self._version += 1
            self._evicted[job_id] = self._version
        while len(self._evicted) > EVICTIONS_KEPT:
            del self._evicted[next(iter(self._evicted))]
        if gone and self._wakeup is not None:
            self._wakeup.set()

    def _job_over(self, job_id: str) -> None:
        self._output_seen.pop(job_id, None)
        if self._records is not None:
            self._records.remove(job_id)
        placement = self._placements.pop(job_id, None)
        if placement is not None:
            # Two calls to the GCS: off the event loop, which serves every job's output.
            asyncio.get_running_loop().run_in_executor(None, release_placement, placement)
        self._changed(job_id)

    def _on_node(self, status: JobStatus) -> JobStatus:
        return attrs.evolve(status, node=self._config.node_name)

    def _check_raylet(self) -> None:
        """Refuse once the node's raylet has exited (the guard is killing this agent)."""
        if self._raylet is not None and select.select([self._raylet], [], [], 0)[0]:
            raise NodeGoingAway(
                f"node {self._config.node_name} is going away (its raylet exited); retry"
            )

    # -- the engine's surface -------------------------------------------------------------

    async def hello(self) -> dict[str, Any]:
        """Readiness check; also runs the start-up sweep. Returns facts for the front's log."""
        self._ready()
        self._check_raylet()
        return {"node": self._config.node_name, "pid": os.getpid(), "swept": self._swept}

    async def start(
        self, job_id: str, spec: JobSpec, owner: str, placement: str | None
    ) -> JobStatus:
        manager = self._ready()
        self._check_raylet()
        if placement is not None:
            self._placements[job_id] = placement
        self._starting.add(job_id)
        try:
            try:
                status = await manager.start_as(job_id, spec, owner)
            except BaseException:
                if self._placements.pop(job_id, None) is not None and placement is not None:
                    release_placement(placement)
                raise
            assert self._records is not None
            self._records.add(job_id, status.pid)  # from here on the guard kills it too
            self._check_raylet()
        finally:
            self._starting.discard(job_id)
        self._changed(job_id)  # reported once answered (a poll meanwhile left it out)
        return self._on_node(status)

    async def stop(self, job_id: str, by: str, grace: float | None) -> StopResult:
        result = await self._ready().stop(job_id, by=by, grace=grace)
        return attrs.evolve(result, status=self._on_node(result.status))

    async def stop_all(self, by: str, grace: float | None) -> None:
        manager = self._ready()
        running = [s.job_id for s in manager.list() if s.state is JobState.RUNNING]
        await asyncio.gather(*(manager.stop(j, by=by, grace=grace) for j in running))

    async def poll(self, since: int, wait: float) -> PollReply:
        """What changed after version ``since``, as soon as something did or after ``wait``
        seconds: the front's long poll, which is also its heartbeat. ``since`` < 0 asks for
        every retained job."""
        manager = self._ready()
        assert self._wakeup is not None
        self._check_raylet()
        if since < 0:
            listed = [s for s in manager.list() if s.job_id not in self._starting]
            return PollReply(self._version, [self._on_node(s) for s in listed])
        if self._version <= since:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait)
            self._check_raylet()
        changed = [
            manager.find(j) for j in _newer(self._changed_at, since) if j not in self._starting
        ]
        return PollReply(
            self._version,
            [self._on_node(s) for s in changed if s is not None],
            _newer(self._evicted, since),
        )

    async def output_port(self, front_cert: bytes) -> PortInfo:
        """Where this node's output port listens and its certificate, pinning the calling
        front's ``front_cert``; the port starts at the first call (:mod:`.outputport`)."""
        return await self._output_port().open(front_cert)

    async def output_ticket(self, front_cert: bytes, grant: TicketGrant) -> Redirect:
        """A ticket for a client the calling front redirects to this node's output port
        (:meth:`.outputport.AgentPort.ticket`)."""
        return await self._output_port().ticket(front_cert, grant)

    def _output_port(self) -> AgentPort:
        manager = self._ready()
        if self._port is None:
            import ray

            host: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call, unused-ignore]
            self._port = AgentPort(host, manager.follow)
        return self._port

    async def input_begin(self, job_id: str) -> int:
        """Become the writer of ``job_id``'s stdin (errors as :meth:`JobManager.write_input`:
        no stdin, another writer); the session for :meth:`input_chunk`."""
        manager = self._ready()
        session = InputSession()
        session.writer = asyncio.ensure_future(manager.write_input(job_id, session.chunks()))
        await session.until(session.asked.wait())
        if session.writer.done():
            session.writer.result()  # raises the refusal
        self._next_input += 1
        number = self._next_input
        self._inputs[number] = session
        # An idle writer is forgotten (nobody may come back for it); another one's end is
        # kept until the front hears it.
        session.writer.add_done_callback(
            lambda _: self._inputs.pop(number, None) if session.idle else None
        )
        return number

    async def input_chunk(self, number: int, chunk: InputChunk) -> InputResult | None:
        """Hand ``chunk`` to the writer once it took the one before; its result once it
        ended (``eof``, the job closed its stdin or exited)."""
        session = self._inputs.get(number)
        if session is None:
            raise FailedPrecondition(
                f"this stdin writer was idle over {INPUT_IDLE_SECONDS:g} s and ended; write again"
            )
        result = await session.until(session.feed.put(chunk))
        if result is None and chunk.eof:
            assert session.writer is not None
            result = await session.writer
        if result is not None:
            self._inputs.pop(number, None)
        return result

    async def input_end(self, number: int) -> InputResult:
        """The writer's end when the client's chunks end (stdin stays open)."""
        session = self._inputs.pop(number, None)
        if session is None or session.writer is None:
            return InputResult(0, closed=False)
        await session.until(session.feed.put(None))
        return await session.writer

    async def usage(self, job_id: str, last: int) -> JobUsage:
        """The samples the node's engine took of ``job_id`` (see :mod:`jobworker.usage`);
        NotFound once the agent no longer keeps the job."""
        return await self._ready().usage(job_id, last)

    async def running_usage(self, last: int) -> list[JobUsage]:
        """The newest ``last`` samples (0: all) of every job running on this node."""
        return await self._ready().running_usage(last)


def _newer(versions: dict[str, int], since: int) -> list[str]:
    """The keys of ``versions`` (in version order) whose version is after ``since``."""
    found = list(itertools.takewhile(lambda item: item[1] > since, reversed(versions.items())))
    return [key for key, _ in reversed(found)]


def release_placement(name: str) -> None:
    """Give a finished job's placement group back to the cluster."""
    import ray
    from ray.util import get_placement_group, remove_placement_group

    try:
        remove_placement_group(get_placement_group(name))
    except (ValueError, ray.exceptions.RayError) as err:
        log.warning("placement_release_failed", placement=name, error=str(err))

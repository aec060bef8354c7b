"""How the front finds the cluster's nodes and keeps hearing from them.

The front joins the cluster as a Ray driver (:func:`join`), then looks for nodes in the
background (:class:`Discovery`): at once, every ``DISCOVER_SECONDS``, and whenever a start
waits for a node. Each new alive node gets its agent started or found (a detached actor
named after the node, so a restarted front finds the same one) and greeted: its first
poll brings the jobs it already runs into the table. From then on one long poll per node
is its heartbeat: it answers as soon as something changed on the node (a job started or
ended, output grew, a job was evicted: only those) and at least every ``POLL_SECONDS``, so
an idle node costs the front one tiny answer per ``POLL_SECONDS``. A failing poll asks the
GCS whether the node is alive, and a node Ray declares dead, or whose agent is gone, is
lost.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import attrs
import structlog

from jobworker.backends.ray.agent import (
    NAMESPACE,
    AgentConfig,
    NodeAgent,
    NodeGoingAway,
    PollReply,
    agent_name,
)
from jobworker.backends.ray.nodes import RETRY_SECONDS, Node, Unreachable, call
from jobworker.backends.ray.table import JobTable
from jobworker.errors import JobworkerError
from jobworker.logconfig import keep_stderr_json

log = structlog.get_logger("jobworker.ray.front")

#: Longest wait of one agent long poll: an idle node's heartbeat period (the suspect
#: deadline, :data:`.nodes.HEARTBEAT_DEADLINE`, is longer).
POLL_SECONDS = 15.0
#: How often the front looks for nodes that joined the cluster.
DISCOVER_SECONDS = 5.0

#: Runs a background task the backend cancels at shutdown.
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class _RayRecords(logging.Handler):
    """Ray's Python log records as events of the front's own log (``ray_log``)."""

    def emit(self, record: logging.LogRecord) -> None:
        fields = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            fields["exception"] = logging.Formatter().formatException(record.exc_info)
        log.log(record.levelno, "ray_log", **fields)


def _ray_published(data: dict[str, Any], ignore_prefix: bool = False) -> None:
    """Stands in for Ray's printer of what the cluster publishes to every driver (a node
    marked dead, a worker killed), which would print plain text to stdout."""
    log.warning("ray_error_reported", source=data.get("pid"),
                message="\n".join(data.get("lines", ())))  # fmt: skip


def _ray_logs_to_json() -> None:
    """Keep the front's log all JSON lines: Ray's Python loggers (configured by Ray at
    import with a plain-text handler) and its published errors become events of ours,
    and what its C++ core prints to stderr ``ray_core_log`` events
    (:func:`~jobworker.logconfig.keep_stderr_json`). Worker output is not forwarded at all
    (``log_to_driver=False``)."""
    import ray._private.worker

    keep_stderr_json("ray_core_log")

    ray_logger = logging.getLogger("ray")
    ray_logger.handlers[:] = [_RayRecords()]
    ray_logger.setLevel(logging.WARNING)
    ray_logger.propagate = False
    ray._private.worker.print_to_stdstream = _ray_published


def join(address: str) -> None:
    """``ray.init`` as a driver of the cluster at ``address``, with SIGTERM left to the
    server and Ray's messages in the front's JSON log (:func:`_ray_logs_to_json`).

    Called on the main thread, before the server serves (it blocks for about a second):
    there, Ray puts its own SIGTERM handler (exit at once) and, under it, a crash reporter
    that prints a C++ stack for every SIGTERM, so that a clean stop would look like a
    crash. SIGTERM goes back to the server's handler (stop the jobs, then exit); the
    crash reporter keeps the signals of real crashes.
    """
    import ray

    if ray.is_initialized():
        return
    _ray_logs_to_json()
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


class Discovery:
    """Finds nodes, greets their agents and watches their heartbeats, keeping ``nodes``
    (shared with the backend and its placer) and the job table up to date."""

    def __init__(
        self, nodes: dict[str, Node], table: JobTable, agent_config: AgentConfig, spawn: Spawn
    ) -> None:
        self._nodes = nodes
        self._table = table
        self._agent_config = agent_config
        self._spawn = spawn
        self._closing = False
        #: Set to have the discovery loop look at once (a start waits for a node).
        self._wake = asyncio.Event()
        #: Set (and replaced) after each look at the cluster: starts waiting for a node.
        self._looked = asyncio.Event()

    @property
    def names(self) -> builtins.list[str]:
        return sorted(node.name for node in self._nodes.values())

    def close(self) -> None:
        """Stop looking and watching (each watcher ends after its current poll)."""
        self._closing = True

    async def run(self) -> None:
        """Look for new nodes at once, then every ``DISCOVER_SECONDS`` or when a start
        waits for a node (:meth:`await_nodes`)."""
        first = True
        while not self._closing:
            try:
                await self._discover()
            except Exception:
                log.exception("ray_discover_failed")
            if first:
                log.info("ray_nodes_discovered", nodes=self.names)
                first = False
            looked, self._looked = self._looked, asyncio.Event()
            looked.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), DISCOVER_SECONDS)
            self._wake.clear()

    async def await_nodes(self, deadline: float) -> bool:
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
        # Creating (or finding) an actor is a blocking call to the GCS: in a thread, so
        # that greeting a thousand nodes never holds the event loop (and every client).
        agent = await asyncio.to_thread(self._agent_handle, node_id, name)
        node = Node(node_id, name, agent, dict(info["Resources"]))
        try:
            hello = await call(agent.hello.remote(), node)
            first: PollReply = await call(agent.poll.remote(-1, 0), node)  # its jobs, at once
        except JobworkerError as err:
            log.warning("agent_unavailable", node=name, error=str(getattr(err, "error", err)))
            return
        node.heard_at = time.monotonic()  # greeting a node may take long on a busy machine
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

    async def _watch(self, node: Node, since: int) -> None:
        """Long-poll one agent (from version ``since``) until the node is lost or the
        backend closes."""
        import ray

        while not self._closing:
            try:
                reply: PollReply = await call(node.agent.poll.remote(since, POLL_SECONDS), node)
            except NodeGoingAway:
                node.distrust()  # its agent is about to die: Ray will declare the node dead
                await asyncio.sleep(RETRY_SECONDS)
                continue
            except Unreachable as err:
                node.distrust()
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

"""How the front finds the cluster's nodes and keeps hearing from them.

The front joins the cluster as a Ray driver (:func:`join`), then looks for nodes in the
background (:class:`Discovery`): at once, then after ``DISCOVER_SECONDS``, the pause
doubling up to ``DISCOVER_MAX_SECONDS`` while the cluster's nodes stay the same (a look
lists every node: its cost grows with the cluster), back to ``DISCOVER_SECONDS`` once a
look finds a node or a node is lost; and at once whenever a start waits for a node.
Each new alive node gets its agent started or found (a detached actor named after the
node, so a restarted front finds the same one) and greeted: its first poll brings the
jobs it already runs into the table. From then on one long poll per node
is its heartbeat: it answers as soon as something changed on the node (a job started or
ended, output grew, a job was evicted: only those) and at least every ``POLL_SECONDS``, so
an idle node costs the front one tiny answer per ``POLL_SECONDS``. A failing poll asks the
GCS whether the node is alive, and a node Ray declares dead, or whose agent is gone, is
lost.

Idle nodes' heartbeats come together (:func:`heartbeat_wait`): each poll waits until its
node's next heartbeat time, which up to ``HEARTBEAT_BATCH`` nodes share. A Ray call's
cost on the front is mostly waking the threads it passes through (the event loop, Ray's
io and gRPC poller threads: about 2.3 ms of CPU for a lone empty poll on the 2-core test
host); answers that arrive together share those wake-ups (about 0.8 ms each in a batch of
nine), so the idle cost per node is about a third of spread-out heartbeats'.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import os
import signal
import threading
import time
import zlib
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

#: An idle node's heartbeat period: its agent's long poll answers at least this often
#: (plus ``POLL_MIN_SECONDS``; the suspect deadline, :data:`.nodes.HEARTBEAT_DEADLINE`,
#: is longer).
POLL_SECONDS = 15.0
#: A poll waits at least this long for a change: one made just before its node's
#: heartbeat time waits for the next one instead of answering empty at once.
POLL_MIN_SECONDS = 1.0
#: Nodes whose idle heartbeats share one time: a larger cluster gets one time per this
#: many nodes, spread over ``POLL_SECONDS``, so that no batch holds the event loop long.
HEARTBEAT_BATCH = 64
#: The pause before the front looks for new nodes again after a look found one (or a
#: node was lost: a replacement may follow)...
DISCOVER_SECONDS = 5.0
#: ... doubling after each look that found none, up to this: a node that joins a cluster
#: whose nodes stayed the same is found within it (at once when a start needs it).
DISCOVER_MAX_SECONDS = 30.0

#: Ray's own reporting from the front's driver, turned down in the front's process only
#: (Ray reads ``RAY_<setting>`` at ``ray.init``; a value the operator set wins). Each
#: period is a wake-up of Ray's threads, and wake-ups are most of an idle front's CPU:
#: together these cut about 0.7 ms/s of its 4.5 on the 2-core test host. What they cost:
#: the front's calls to the agents are missing or incomplete in Ray's task list (``ray
#: list tasks``, the dashboard's task view), its Ray metrics are exported every 60 s
#: instead of 10 s, and its Ray log has no event loop statistics.
DRIVER_SETTINGS = {
    "RAY_task_events_report_interval_ms": "0",
    "RAY_metrics_report_interval_ms": "60000",
    "RAY_event_stats": "0",
}

#: Runs a background task the backend cancels at shutdown.
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def heartbeat_wait(node_id: str, nodes: int, now: float) -> float:
    """How long a poll of node ``node_id`` made at ``now`` (monotonic) may wait for a
    change, in a cluster of ``nodes``: until its node's next heartbeat time, at least
    ``POLL_MIN_SECONDS`` away. The times repeat every ``POLL_SECONDS``; nodes fall into
    ``ceil(nodes / HEARTBEAT_BATCH)`` batches by a hash of their id, each batch's time
    offset by its share of the period."""
    batches = max(1, math.ceil(nodes / HEARTBEAT_BATCH))
    phase = zlib.crc32(node_id.encode()) % batches * POLL_SECONDS / batches
    turns = math.ceil((now + POLL_MIN_SECONDS - phase) / POLL_SECONDS)
    return phase + turns * POLL_SECONDS - now


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
    server, Ray's messages in the front's JSON log (:func:`_ray_logs_to_json`) and less of
    Ray's reporting (:data:`DRIVER_SETTINGS`).

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
    for name, value in DRIVER_SETTINGS.items():
        os.environ.setdefault(name, value)
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


def _node_name(info: dict[str, Any]) -> str:
    """A node's name as jobs pin it: its ``--node-name``, else its address."""
    name: str = info.get("NodeName") or info["NodeManagerAddress"]
    return name


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
        #: Looks begun, and the number of the last one done (a waiter wants one begun
        #: after it asked: one under way may have listed the nodes before it joined).
        self._begun = 0
        self._done = 0
        #: Names of the nodes whose agents the look under way is greeting.
        self._greeting: set[str] = set()
        #: Set when a node was lost (it wakes the loop): the next looks come sooner again.
        self._lost = False

    @property
    def names(self) -> builtins.list[str]:
        return sorted(node.name for node in self._nodes.values())

    def close(self) -> None:
        """Stop looking and watching (each watcher ends after its current poll)."""
        self._closing = True

    async def run(self) -> None:
        """Look for new nodes at once, then as the module docstring says, or when a start
        waits for a node (:meth:`await_nodes`)."""
        first = True
        pause = DISCOVER_SECONDS
        while not self._closing:
            found = True
            self._begun += 1
            number = self._begun
            try:
                found = await self._discover()
            except Exception:
                log.exception("ray_discover_failed")
            if first:
                log.info("ray_nodes_discovered", nodes=self.names)
                first = False
            self._done = number
            looked, self._looked = self._looked, asyncio.Event()
            looked.set()
            lost, self._lost = self._lost, False
            pause = DISCOVER_SECONDS if found or lost else min(pause * 2, DISCOVER_MAX_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)
            self._wake.clear()

    async def await_nodes(self, deadline: float, name: str | None = None) -> bool:
        """Wait for a look at the cluster begun from now, until ``deadline`` (monotonic),
        or, if that look is greeting node ``name``'s agent, until the greeting ends
        (bounded by the agent calls' own timeout: an agent starting on a busy node may
        take longer than the deadline); whether there is time left to try again."""
        wanted = self._begun + 1
        self._wake.set()
        while self._done < wanted:
            left = deadline - time.monotonic()
            if left <= 0 and name not in self._greeting:
                return False
            looked = self._looked
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(looked.wait(), None if name in self._greeting else left)
        return time.monotonic() < deadline

    async def _discover(self) -> bool:
        """An agent on every alive node not known yet: all greeted at once. Whether there
        was any (a greeting may fail: the next look comes soon)."""
        import ray

        nodes = await asyncio.to_thread(ray.nodes)
        new = [n for n in nodes if n["Alive"] and n["NodeID"] not in self._nodes]
        self._greeting = {_node_name(info) for info in new}
        try:
            await asyncio.gather(*(self._greet(info) for info in new))
        finally:
            self._greeting = set()
        return bool(new)

    async def _greet(self, info: dict[str, Any]) -> None:
        """Start or find the agent of the node ``info`` describes; the node takes jobs once
        its agent answers."""
        node_id = info["NodeID"]
        name = _node_name(info)
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
            wait = heartbeat_wait(node.node_id, len(self._nodes), time.monotonic())
            try:
                reply: PollReply = await call(node.agent.poll.remote(since, wait), node)
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
                    self._lost = True
                    self._wake.set()
                    return
                await asyncio.sleep(RETRY_SECONDS)
                continue
            since, node.heard_at = reply.version, time.monotonic()
            self._table.merge(node, reply)

    async def _alive(self, node: Node) -> bool:
        import ray

        nodes = await asyncio.to_thread(ray.nodes)
        return any(n["NodeID"] == node.node_id and n["Alive"] for n in nodes)

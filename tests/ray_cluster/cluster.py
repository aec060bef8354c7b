"""A local Ray cluster for tests and benchmarks: a head and worker nodes on this machine.

Every Ray process binds to 127.0.0.1 (Ray's ports run code for anyone who reaches them).
Two Ray behaviours shape this module:

* ``ray start`` turns an explicit 127.0.0.1 into the machine's outward address, and refuses
  to add a node when told it runs on a single-node platform (the only switch that keeps
  127.0.0.1). ``ray.cluster_utils.Cluster`` (what Ray's own tests use) starts nodes without
  that check, so a keeper process runs one with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``;
  every driver that connects (the front server) needs the same variable.
* Nodes on one host need distinct agent and metrics ports, else the extra nodes' agents fail
  to bind: each node gets its own block of free ports.

Token authentication (``RAY_AUTH_MODE=token``, the token in the file ``RAY_AUTH_TOKEN_PATH``
names) is turned on by passing those variables in ``env``: every Ray process of the cluster
inherits them from the keeper, as every node's ``ray start`` would from its unit.

The keeper is the parent of every Ray process it starts; tear-down closes its standard input
(it shuts the cluster down) and then kills whatever of its process tree is left, never
another user's Ray (``ray stop`` would kill every Ray process of the machine).

Run as a script, this module is the keeper: ``python cluster.py NODES_JSON TEMP_DIR``; it
prints the cluster's description as one JSON line, then adds a node for each ``add
NODE_JSON`` line on its standard input, and shuts the cluster down when that closes.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
#: What a driver process needs in its environment to reach a cluster bound to 127.0.0.1.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_IMPORT_WARNING": "1",
}
_START_TIMEOUT_S = 90.0


def token_auth(path: Path, mode: int = 0o600) -> dict[str, str]:
    """Write a fresh token to ``path`` (``mode``); the environment that turns token
    authentication on for every Ray process of a cluster and for its drivers."""
    path.write_text(secrets.token_hex(32))
    path.chmod(mode)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def free_port_block(count: int) -> int:
    """A base port whose next ``count`` ports are free now (best effort, like port 0)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            base: int = probe.getsockname()[1]
        if base + count >= 65000:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind((HOST, port))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of free ports on 127.0.0.1")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before children, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (found before the first kill)."""
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LocalCluster:
    """A running cluster; ``address`` is the head's GCS ``HOST:PORT``."""

    def __init__(self, keeper: subprocess.Popen[str], info: dict[str, Any]) -> None:
        self._keeper = keeper
        #: The keeper process: every process of the cluster is below it.
        self.keeper_pid = keeper.pid
        self.address: str = info["address"]
        self.node_ids: dict[str, str] = info["node_ids"]
        self.raylets: dict[str, int] = info["raylets"]
        #: Each node's raylet port (``NodeManagerService``).
        self.raylet_ports: dict[str, int] = info["raylet_ports"]
        #: The head's Ray client server port (``ray://``).
        self.client_port: int = info["client_port"]

    def kill_raylet(self, name: str) -> None:
        """SIGKILL node ``name``'s raylet, as a lost machine would look to the cluster."""
        os.kill(self.raylets[name], signal.SIGKILL)

    def add_node(self, node: dict[str, Any]) -> None:
        """Start one more node (a lost one coming back under its name, say); returns once
        it is alive."""
        keeper = self._keeper
        assert keeper.stdin is not None and keeper.stdout is not None
        keeper.stdin.write(f"add {json.dumps(node)}\n")
        keeper.stdin.flush()
        info = json.loads(keeper.stdout.readline())
        self.node_ids, self.raylets = info["node_ids"], info["raylets"]
        self.raylet_ports = info["raylet_ports"]

    def stop(self) -> None:
        keeper = self._keeper
        if keeper.poll() is None:
            tree = descendants(keeper.pid)
            assert keeper.stdin is not None
            keeper.stdin.close()
            try:
                keeper.wait(30)
            except subprocess.TimeoutExpired:
                pass
            for p in tree:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            kill_tree(keeper.pid)
        keeper.wait(10)
        if keeper.stdout is not None:
            keeper.stdout.close()


@contextmanager
def local_cluster(
    nodes: list[dict[str, Any]], log_path: Path, env: dict[str, str] | None = None
) -> Iterator[LocalCluster]:
    """Start ``nodes`` (the first is the head), yield the cluster, always tear it down.

    Each node is ``{"name": str, "num_cpus": int, "memory": bytes}``; ``env`` adds to the
    Ray processes' environment (``RAY_<setting>`` overrides Ray's system configuration).
    """
    # Ray puts unix sockets in its temp dir: the path must stay short.
    temp_dir = tempfile.mkdtemp(prefix="rjw-", dir="/tmp")
    # Ray also writes the cluster's address under RAY_TMPDIR (default /tmp/ray), for
    # ``ray.init()`` to find: keep that inside this cluster's directory too.
    Path(temp_dir, "ray").mkdir()
    env = {**os.environ, **RAY_ENV, **(env or {}), "RAY_TMPDIR": temp_dir}
    with log_path.open("w") as log:
        keeper = subprocess.Popen(
            [sys.executable, __file__, json.dumps(nodes), temp_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
    cluster: LocalCluster | None = None
    try:
        assert keeper.stdout is not None
        line = keeper.stdout.readline()
        if not line:
            raise RuntimeError(f"the Ray cluster did not start: see {log_path}")
        cluster = LocalCluster(keeper, json.loads(line))
        yield cluster
    finally:
        if cluster is None:
            kill_tree(keeper.pid)
            keeper.wait(10)
            for pipe in (keeper.stdin, keeper.stdout):
                if pipe is not None:
                    pipe.close()
        else:
            cluster.stop()


def _add(cluster: Any, node: dict[str, Any], head: bool, temp_dir: str, wait: bool = False) -> Any:
    base = free_port_block(6)
    args: dict[str, Any] = {
        "node_ip_address": HOST,
        "node_name": node["name"],
        "num_cpus": node["num_cpus"],
        "memory": node["memory"],
        "object_store_memory": 80 * 1024 * 1024,
        "include_dashboard": False,
        "dashboard_agent_listen_port": base,
        "metrics_export_port": base + 2,
        "runtime_env_agent_port": base + 3,
        "wait": wait,
    }
    if head:
        args["temp_dir"] = str(Path(temp_dir, "ray"))
        args["ray_client_server_port"] = base + 4
    return cluster.add_node(**args)


def _describe(started: dict[str, Any]) -> dict[str, Any]:
    return {
        "node_ids": {name: n.node_id for name, n in started.items()},
        "raylets": {name: n.all_processes["raylet"][0].process.pid for name, n in started.items()},
        "raylet_ports": {name: n.node_manager_port for name, n in started.items()},
    }


def _keep(nodes: list[dict[str, Any]], temp_dir: str) -> None:
    """Start the cluster, print its description, then serve ``add NODE_JSON`` lines (each
    answered with the new description) until standard input closes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(shutdown_at_exit=False)
    try:
        started = {}
        for i, node in enumerate(nodes):
            started[node["name"]] = _add(cluster, node, i == 0, temp_dir)
        cluster.wait_for_nodes(_START_TIMEOUT_S)
        client_port = cluster.head_node._ray_params.ray_client_server_port
        info = {"address": cluster.address, "client_port": client_port, **_describe(started)}
        print(json.dumps(info), flush=True)
        for line in sys.stdin:
            command, _, argument = line.partition(" ")
            if command == "add":
                node = json.loads(argument)
                # Waits for this node only: a killed one stays in the cluster's list.
                started[node["name"]] = _add(cluster, node, False, temp_dir, wait=True)
                print(json.dumps(_describe(started)), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    _keep(json.loads(sys.argv[1]), sys.argv[2])

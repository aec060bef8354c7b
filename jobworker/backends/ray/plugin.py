"""The ``ray`` plugin: ``jobworker serve --plugin ray --ray-address HOST:PORT``.

It provides the server's job backend (:class:`.front.RayBackend`) instead of the local
engine. The loaded plugins that act where the job runs (those implementing
:data:`NODE_HOOKS`: cgroupv2, isolation, and authz for the accounts a job may run as) are
loaded by every node agent too, with the same options; the others (audit-log, policies)
act on the front server only.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobworker.errors import ConfigError
from jobworker.hooks import hookimpl
from jobworker.hooks.host import available_plugins

if TYPE_CHECKING:
    from jobworker.backends.base import JobBackend
    from jobworker.config import ServerConfig
    from jobworker.hooks.host import Plugins

#: The hooks called where the job's processes are: a plugin implementing one runs on nodes.
NODE_HOOKS = (
    "jobworker_limits_apply",
    "jobworker_isolate",
    "jobworker_accounts",
    "jobworker_networks",
)


def _portable(value: Any) -> bool:
    if isinstance(value, str | int | float | bool | type(None)):
        return True
    if isinstance(value, list | tuple):
        return all(_portable(v) for v in value)
    return False


def node_options(options: argparse.Namespace) -> dict[str, Any]:
    """The serve options a node-side plugin may read, as plain values (paths as text)."""
    found = {}
    for key, value in vars(options).items():
        if isinstance(value, Path):
            value = str(value)
        if _portable(value):
            found[key] = value
    return found


class RayPlugin:
    """Options, then the backend; one instance per server."""

    #: One line for `jobworker plugins`.
    description = "runs jobs on the nodes of a Ray cluster (--ray-address; needs jobworker[ray])"

    def __init__(self) -> None:
        self._options: argparse.Namespace | None = None

    @hookimpl
    def jobworker_add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ray (cluster backend)")
        group.add_argument(
            "--ray-address",
            metavar="HOST:PORT",
            help="the Ray head's GCS address; jobs run on the cluster's nodes",
        )
        group.add_argument(
            "--ray-placement-timeout",
            type=float,
            default=10.0,
            metavar="SECONDS",
            help="how long a job may wait for a node with its --cpu/--memory free before"
            " RESOURCE_EXHAUSTED (default %(default)s)",
        )
        group.add_argument(
            "--ray-allow-unauthenticated",
            action="store_true",
            help="UNSAFE: join a Ray cluster without token authentication (anyone who"
            " reaches its ports runs code on every node); every job start logs a warning",
        )
        group.add_argument(
            "--ray-direct-output",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="send clients that can reach the nodes (the CLI says it can) to the job's"
            " node for its output, with a one-call ticket, instead of relaying it through"
            " this server (default: on; turn off where clients cannot reach the nodes' private"
            " addresses, or all traffic must pass the front servers)",
        )
        group.add_argument(
            "--ray-spool-dir",
            metavar="DIR",
            help="spool root on every node (default: the per-user default on each node)",
        )

    @hookimpl
    def jobworker_configure(self, options: argparse.Namespace) -> None:
        if not getattr(options, "ray_address", None):
            raise ConfigError("--plugin ray needs --ray-address HOST:PORT (the Ray head's GCS)")
        if options.ray_placement_timeout <= 0:
            raise ConfigError("--ray-placement-timeout must be a positive number of seconds")
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--plugin ray needs Ray: pip install 'jobworker[ray]'") from None
        self._options = options

    @hookimpl
    async def jobworker_make_backend(
        self, plugins: Plugins, config: ServerConfig, spool_dir: Path
    ) -> JobBackend | None:
        from jobworker.backends.ray.agent import AgentConfig
        from jobworker.backends.ray.front import RayBackend

        options = self._options
        if options is None:
            return None
        loadable = set(available_plugins())
        node_plugins = tuple(n for n in plugins.implementing(NODE_HOOKS) if n in loadable)
        agent_config = AgentConfig(
            node_name="",
            plugins=node_plugins,
            options=node_options(options),
            spool_root=options.ray_spool_dir,
            default_grace=config.default_grace,
            max_running=config.max_running,
            retain_finished=config.retain_finished,
            retain_seconds=config.retain_seconds,
        )
        # Redirected clients' certificates chain to this CA (read once: see docs/cluster.md).
        client_ca = None
        if options.ray_direct_output:
            client_ca = await asyncio.to_thread(Path(config.tls.ca).read_bytes)
        return await RayBackend.connect(
            options.ray_address,
            plugins,
            agent_config,
            placement_timeout=options.ray_placement_timeout,
            allow_unauthenticated=options.ray_allow_unauthenticated,
            client_ca=client_ca,
            default_grace=config.default_grace,
            max_running=config.max_running,
            max_running_per_client=config.max_running_per_client,
        )

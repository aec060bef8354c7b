"""``jobworker serve``: its options, then :class:`jobworker.api.server.ServerConfig` and
:func:`jobworker.api.server.serve` do the rest."""

from __future__ import annotations

import argparse
import functools
import signal
from pathlib import Path
from typing import Any, NoReturn

from jobworker.api.address import DEFAULT_ADDRESS
from jobworker.api.connections import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTION_AGE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER,
)
from jobworker.api.tlsfiles import default_pki_dir
from jobworker.api.wire import DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_MAX_STREAMS_PER_CLIENT
from jobworker.cli.common import argument
from jobworker.hooks.host import Plugins
from jobworker.logconfig import LEVELS, configure_logging
from jobworker.units import parse_count, parse_seconds, parse_size


def add_command(commands: Any, plugins: Plugins) -> None:
    """Add ``serve`` to ``commands``; the loaded ``plugins`` add their own options to it."""
    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the jobworker server. Without --tls-* options it uses (and on "
        f"first use creates) the dev PKI in {default_pki_dir()} and its authz.toml.",
    )
    serve.add_argument(
        "--listen", default=DEFAULT_ADDRESS, metavar="HOST:PORT", help="default %(default)s"
    )
    serve.add_argument("--tls-cert", type=Path, metavar="FILE", help="server certificate")
    serve.add_argument("--tls-key", type=Path, metavar="FILE", help="server private key")
    serve.add_argument("--tls-ca", type=Path, metavar="FILE", help="CA bundle for clients")
    serve.add_argument("--tls-crl", type=Path, metavar="FILE", help="revoked client certs")
    serve.add_argument(
        "--plugin", action="append", default=[], metavar="NAME", help="load a plugin"
    )
    serve.add_argument("--spool-dir", type=Path, metavar="DIR", help="where job output goes")
    serve.add_argument(
        "--grace",
        type=argument(parse_seconds),
        default=10.0,
        metavar="SECONDS",
        help="default stop grace period (default %(default)s)",
    )
    serve.add_argument(
        "--max-jobs",
        type=argument(parse_count),
        default=1000,
        metavar="N",
        help="most jobs running at once; more get RESOURCE_EXHAUSTED (default %(default)s)",
    )
    serve.add_argument(
        "--max-jobs-per-client",
        type=argument(parse_count),
        default=None,
        metavar="N",
        help="most jobs one client identity (admins too) has running at once; more get "
        "RESOURCE_EXHAUSTED (default: --max-jobs)",
    )
    serve.add_argument(
        "--retain-jobs",
        type=argument(parse_count),
        default=1000,
        metavar="N",
        help="finished jobs (and their output) kept for status and logs (default %(default)s)",
    )
    serve.add_argument(
        "--retain-seconds",
        type=argument(parse_seconds),
        default=3600.0,
        metavar="SECONDS",
        help="how long a finished job is kept at most (default %(default)s)",
    )
    serve.add_argument(
        "--max-output-bytes",
        type=argument(parse_size),
        default=DEFAULT_MAX_OUTPUT_BYTES,
        metavar="SIZE",
        help="output kept per job; past it the output is cut, the job goes on, and its"
        " status says output_truncated (default 4G)",
    )
    serve.add_argument(
        "--max-spool-bytes",
        type=argument(parse_size),
        default=None,
        metavar="SIZE",
        help="output kept for all jobs together, finished ones included (default: 90%% of"
        " the spool filesystem's free space at start-up)",
    )
    serve.add_argument(
        "--max-spool-bytes-per-client",
        type=argument(parse_size),
        default=None,
        metavar="SIZE",
        help="output kept for the jobs of one client together: one client filling its"
        " share never cuts another's output (default: a quarter of --max-spool-bytes)",
    )
    serve.add_argument(
        "--max-streams-per-client",
        type=argument(parse_count),
        default=DEFAULT_MAX_STREAMS_PER_CLIENT,
        metavar="N",
        help="output streams (logs, run) one client may have open at once; more get"
        " RESOURCE_EXHAUSTED (default %(default)s)",
    )
    _add_connection_options(serve)
    serve.add_argument(
        "--live-restore",
        action="store_true",
        help="stopping (or losing) the server leaves its jobs running, and the next serve"
        " with this option and the same --spool-dir adopts them (docs/upgrading.md)",
    )
    serve.add_argument("--log-level", choices=LEVELS, default="info")
    serve.set_defaults(handler=functools.partial(_serve, plugins))
    plugins.add_options(serve)


def _add_connection_options(serve: argparse.ArgumentParser) -> None:
    """What a connection may hold, before and after authentication (docs/security.md)."""
    serve.add_argument(
        "--handshake-timeout",
        type=argument(parse_seconds),
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="a connection that has not finished its TLS handshake by then is closed"
        " (default %(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=argument(parse_count),
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="connections open at once, authenticated or not; more are closed at once"
        " (default %(default)s, fewer if RLIMIT_NOFILE is too low)",
    )
    serve.add_argument(
        "--max-connections-per-peer",
        type=argument(parse_count),
        default=DEFAULT_MAX_CONNECTIONS_PER_PEER,
        metavar="N",
        help="connections open at once from one IP address; its newest past that are"
        " closed (default %(default)s)",
    )
    serve.add_argument(
        "--max-connection-age",
        type=argument(parse_seconds),
        default=DEFAULT_MAX_CONNECTION_AGE,
        metavar="SECONDS",
        help="after this a connection takes no new RPCs and the client reconnects, its"
        " certificate checked again by a new handshake (default %(default)s)",
    )


def _stop_before_serving(signum: int, frame: object) -> NoReturn:
    """SIGTERM/SIGINT while the server is still setting up: nothing runs yet, exit 0."""
    raise SystemExit(0)


def _serve(plugins: Plugins, options: argparse.Namespace) -> int:
    # Until serve() installs its own handlers (which stop jobs first), a stop request
    # unwinds the set-up cleanly instead of dying with 143.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_before_serving)
    # Until serve() reloads on SIGHUP, one is ignored rather than fatal.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Imported here so that client commands do not pay for loading the server.
    import asyncio

    from jobworker.api.server import serve
    from jobworker.config import ServerConfig

    configure_logging(options.log_level)
    config = ServerConfig.from_options(options)
    plugins.configure(options)
    asyncio.run(serve(config, plugins))
    return 0

"""A jobworker server for the benchmarks: ``serve()`` as ``jobworker serve`` runs it.

Differences from the CLI, all for measuring: it listens on an ephemeral port of 127.0.0.1
and prints the address on stdout once serving, and logs JSON to stderr at any level.
"""

from __future__ import annotations

# jobworker.api.tls sets grpc's process-wide TLS options while it imports grpc: it goes first.
from jobworker.api import tls  # isort: split

import argparse
import asyncio
from pathlib import Path

import jobworker.api.server
import jobworker.config
from jobworker.api.pki import PkiPaths
from jobworker.hooks.host import Plugins
from jobworker.logconfig import configure_logging
from jobworker.plugins.authz import Authz
from jobworker.plugins.isolation import Isolation


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--retain", type=int, default=1000)
    p.add_argument("--max-running", type=int, default=1000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--no-isolation", action="store_true")
    p.add_argument("--metrics", action="store_true", help="load the metrics plugin")
    p.add_argument("--max-streams-per-client", type=int, default=100)
    p.add_argument("--max-output-bytes", type=int, default=64 << 30)
    p.add_argument("--spool-dir", type=Path)
    p.add_argument("--live-restore", action="store_true")
    options = p.parse_args()
    configure_logging(options.log_level, json=True)
    pki = PkiPaths(options.pki)
    plugins = Plugins()
    plugins.register(Authz.from_file(pki.authz), name="authz")
    isolation = Isolation()
    isolation.jobworker_configure(
        argparse.Namespace(
            no_isolation=options.no_isolation,
            tls_cert=pki.server_cert,
            tls_key=pki.server_key,
            tls_ca=pki.ca_cert,
            authz=pki.authz,
        )
    )
    plugins.register(isolation, name="isolation")
    if options.metrics:
        from jobworker.plugins.metrics import Metrics

        metrics = Metrics()
        metrics.jobworker_configure(
            argparse.Namespace(
                metrics_listen="127.0.0.1:0", metrics_tls=False, metrics_plain_http=False
            )
        )
        plugins.register(metrics, name="metrics")
        plugins.metrics_ready()
    plugins.load([])
    config = jobworker.config.ServerConfig(
        listen="127.0.0.1:0",
        tls=pki.server(),
        default_grace=5.0,
        max_running=options.max_running,
        retain_finished=options.retain,
        max_streams_per_client=options.max_streams_per_client,
        max_output_bytes=options.max_output_bytes,
        spool_dir=options.spool_dir,
        live_restore=options.live_restore,
    )

    def ready(address: str) -> None:
        print(address, flush=True)

    asyncio.run(jobworker.api.server.serve(config, plugins, ready=ready))


if __name__ == "__main__":
    assert tls
    main()

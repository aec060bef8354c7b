"""What ``jobworker serve`` was told: one :class:`ServerConfig`, below the hooks and the
server that both read it (so neither imports the other for it)."""

from __future__ import annotations

import argparse
from pathlib import Path

import attrs
import structlog

from jobworker.api.address import DEFAULT_ADDRESS
from jobworker.api.connections import ConnectionLimits
from jobworker.api.tlsfiles import TlsFiles, given_files
from jobworker.api.wire import DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_MAX_STREAMS_PER_CLIENT
from jobworker.errors import ConfigError

log = structlog.get_logger("jobworker.config")


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` as a pair; ConfigError, in one line, when it is not one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"listen address {listen!r} is not HOST:PORT (e.g. 127.0.0.1:50051, [::1]:0)"
        )
    return host, int(port)


def _check_listen(instance: ServerConfig, attribute: attrs.Attribute[str], value: str) -> None:
    split_listen(value)


#: Share of the spool filesystem's free space (at start-up) all jobs' output may take when
#: ``serve --max-spool-bytes`` is not given: the rest stays for everyone else on that disk.
SPOOL_SHARE_OF_FREE = 0.9
#: Share of the spool budget one client's jobs may hold when ``serve
#: --max-spool-bytes-per-client`` is not given (docs/security.md, "Spool fairness").
SPOOL_SHARE_PER_CLIENT = 0.25


@attrs.frozen(kw_only=True)
class ServerConfig:
    """What ``jobworker serve`` was told; ``spool_dir`` None means the default root
    (see :mod:`jobworker.backends.local.spool`)."""

    listen: str = attrs.field(default=DEFAULT_ADDRESS, validator=_check_listen)
    tls: TlsFiles
    spool_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    default_grace: float = 10.0
    max_running: int = 1000
    max_running_per_client: int | None = None
    retain_finished: int = 1000
    retain_seconds: float = 3600.0
    #: Output kept per job (None: no cap); past it the job's output is cut.
    max_output_bytes: int | None = DEFAULT_MAX_OUTPUT_BYTES
    #: Spool all jobs may hold; None: 90% of the spool filesystem's free space at start.
    max_spool_bytes: int | None = None
    #: Spool one client's jobs may hold; None: a quarter of the budget.
    max_spool_bytes_per_client: int | None = None
    #: Output streams one client identity may have open at once (None: no bound).
    max_streams_per_client: int | None = DEFAULT_MAX_STREAMS_PER_CLIENT
    #: Handshake timeout, connection caps and age (docs/security.md, "Connection limits").
    connections: ConnectionLimits = attrs.field(factory=ConnectionLimits)
    #: Leave jobs running when the server stops, and adopt those of the previous server
    #: (docs/upgrading.md).
    live_restore: bool = False

    @classmethod
    def from_options(cls, options: argparse.Namespace) -> ServerConfig:
        """What ``jobworker serve``'s options describe.

        Without ``--tls-*`` options the dev PKI is used (created on first use), and its
        whitelist becomes ``options.authz`` unless one was given.
        """
        files = given_files(options.tls_cert, options.tls_key, options.tls_ca, crl=options.tls_crl)
        if files is None:
            # Only the server makes certificates: the client never imports cryptography.
            from jobworker.api.pki import init_pki
            from jobworker.api.tlsfiles import DEV_CLIENT, default_pki_dir

            pki = init_pki(default_pki_dir())
            files = pki.server()._replace(crl=options.tls_crl)
            if getattr(options, "authz", None) is None:
                options.authz = pki.authz
            # Plugins see the files in use: the isolation plugin hides them from jobs.
            options.tls_cert, options.tls_key, options.tls_ca = files.cert, files.key, files.ca
            log.info(
                "dev_pki",
                directory=str(pki.directory),
                authz=str(options.authz),
                client_cert=str(pki.client_cert(DEV_CLIENT)),
                hint="client commands on this machine use it when given no --tls-* options",
            )
        return cls(
            listen=options.listen,
            tls=files,
            spool_dir=options.spool_dir,
            default_grace=options.grace,
            max_running=options.max_jobs,
            max_running_per_client=options.max_jobs_per_client,
            retain_finished=options.retain_jobs,
            retain_seconds=options.retain_seconds,
            max_output_bytes=options.max_output_bytes,
            max_spool_bytes=options.max_spool_bytes,
            max_spool_bytes_per_client=options.max_spool_bytes_per_client,
            max_streams_per_client=options.max_streams_per_client,
            connections=ConnectionLimits(
                handshake_timeout=options.handshake_timeout,
                max_connections=options.max_connections,
                max_connections_per_peer=options.max_connections_per_peer,
                max_connection_age=options.max_connection_age,
            ),
            live_restore=options.live_restore,
        )

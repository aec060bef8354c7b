"""The ``metrics`` built-in plugin: Prometheus metrics at ``/metrics``.

``jobworker serve --plugin metrics`` serves the text exposition of its own
``prometheus_client.CollectorRegistry`` on ``--metrics-listen`` (default
``127.0.0.1:9464``). A non-loopback address must say how it is protected:
``--metrics-tls`` serves HTTPS with the server's certificate and requires a client
certificate from the server's CA whose identity is on the authorization whitelist and
not revoked by its CRL, all of them reloaded on SIGHUP with the gRPC port's;
``--metrics-plain-http`` says plain HTTP is meant.

Counters and gauges follow the hooks (job started, refused, exited; RPCs; output); the
per-job usage gauges and the spool figures are read when scraped. Label values are bounded
(docs/observability.md): owners beyond :data:`MAX_OWNERS` count as ``_other``, and per-job
series exist only while the job is retained. Other plugins add their metrics in
``jobworker_metrics_ready(registry)``.

Needs ``prometheus-client`` (``pip install 'jobworker[metrics]'``); the core does not.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import attrs
import structlog

from jobworker.api.identity import Identity
from jobworker.api.tls import RevocationList
from jobworker.backends.base import JobBackend
from jobworker.errors import ConfigError, JobworkerError
from jobworker.hooks import hookimpl
from jobworker.jobspec import JobSpec
from jobworker.model import Action, JobStatus
from jobworker.plugins.authz import Authz

try:
    import prometheus_client
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as err:  # the plugin host turns this into "plugin 'metrics' failed to load"
    raise ImportError(
        "the metrics plugin needs prometheus-client: pip install 'jobworker[metrics]'"
    ) from err

log = structlog.get_logger("jobworker.metrics")

DEFAULT_LISTEN = "127.0.0.1:9464"
#: Distinct owner label values; later owners are counted as ``_other``.
MAX_OWNERS = 100
OTHER_OWNER = "_other"
#: RPC latency buckets, seconds: StartJob takes milliseconds, a followed stream hours.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 600)
#: Seconds a scraper has for its TLS handshake, and for each read or write of its request.
SCRAPE_TIMEOUT = 10.0


def _split(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--metrics-listen {listen!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _peer_identity(cert: dict[str, Any]) -> Identity | None:
    """The identity of a verified peer certificate (``SSLSocket.getpeercert()``)."""
    cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "")
    sans = tuple(v for _, v in cert.get("subjectAltName", ()))
    try:
        return Identity(cn, sans)
    except (TypeError, ValueError):
        return None


def _tls_context(options: argparse.Namespace) -> ssl.SSLContext:
    """TLS 1.3 with the server's certificate; a client certificate from its CA required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=str(options.tls_ca))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"--metrics-tls: CA bundle {options.tls_ca}: {err}") from err
    try:
        context.load_cert_chain(str(options.tls_cert), str(options.tls_key))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"--metrics-tls: certificate {options.tls_cert} and key {options.tls_key}: {err}"
        ) from err
    return context


@attrs.define
class _ScrapeGate:
    """Who may scrape over ``--metrics-tls``: the TLS context (the server's certificate, its
    CA) and the gRPC port's whitelist and CRL. SIGHUP re-reads them all with the server's
    own (``jobworker_reload``), and all of them, or none, are put in force."""

    options: argparse.Namespace
    context: ssl.SSLContext
    whitelist: Authz
    crl: RevocationList | None

    @classmethod
    def load(cls, options: argparse.Namespace) -> _ScrapeGate:
        if getattr(options, "authz", None) is None:
            raise ConfigError("--metrics-tls needs the authorization whitelist (--authz)")
        crl_path = getattr(options, "tls_crl", None)
        crl = None if not crl_path else RevocationList(Path(crl_path), Path(options.tls_ca))
        return cls(options, _tls_context(options), Authz.from_file(options.authz), crl)

    def prepare(self) -> Callable[[], None]:
        """Read everything again; raises ``ConfigError`` naming the file, and then the
        returned callable, which puts it in force, is not made."""
        context = _tls_context(self.options)
        whitelist = Authz.from_file(self.options.authz)
        crl_commit = None if self.crl is None else self.crl.prepare()

        def commit() -> None:
            self.context, self.whitelist = context, whitelist
            if crl_commit is not None:
                crl_commit()
            log.info("metrics_tls_reloaded", clients=len(whitelist.clients))

        return commit

    def admits(self, conn: ssl.SSLSocket, peer: Any) -> bool:
        """Whether the verified peer of a finished handshake may scrape (and a log if not)."""
        identity = _peer_identity(conn.getpeercert() or {})
        der = conn.getpeercert(binary_form=True)
        crl = self.crl
        revoked = crl is not None and (
            der is None or crl.is_revoked(ssl.DER_cert_to_PEM_cert(der).encode())
        )
        if identity is not None and not revoked and self.whitelist.role_of(identity) is not None:
            return True
        shown = None if identity is None else identity.name
        log.warning("metrics_scrape_refused", peer=str(peer), identity=shown, revoked=revoked)
        return False


class _Handler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """A scrape is not worth a line on stderr."""


class _Endpoint(socketserver.ThreadingMixIn, WSGIServer):
    """The HTTP(S) server of ``/metrics``, a thread per connection.

    Made here rather than by ``prometheus_client.start_http_server``, which wraps the
    listening socket in one TLS context for good and shakes hands in the accept loop: here
    each accepted connection is wrapped in the gate's context of the moment (so a reload
    takes effect at the next connection), and the handshake and the whitelist check run in
    the connection's own thread with a deadline, so a client that stalls them holds up no
    one else.
    """

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], family: socket.AddressFamily, gate: _ScrapeGate | None
    ) -> None:
        self.address_family = family
        self.gate = gate
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, peer = self.socket.accept()
        if self.gate is None:
            return conn, peer
        return self.gate.context.wrap_socket(
            conn, server_side=True, do_handshake_on_connect=False
        ), peer

    def finish_request(self, request: Any, client_address: Any) -> None:
        gate = self.gate
        if gate is not None:
            request.settimeout(SCRAPE_TIMEOUT)
            try:
                request.do_handshake()
            except OSError as err:  # no or a bad certificate, a timeout, a reset
                log.warning("metrics_scrape_refused", peer=str(client_address), error=str(err))
                return
            if not gate.admits(request, client_address):
                return
        super().finish_request(request, client_address)


class _ScrapeTime(Collector):
    """Figures read when scraped: per-job usage, spool size and free space."""

    def __init__(self, plugin: Metrics) -> None:
        self._plugin = plugin

    def collect(self) -> Iterator[Any]:
        manager = self._plugin.manager
        if manager is None:
            return
        latest = getattr(manager, "latest_usage", None)
        if latest is not None:
            yield from _job_families(latest())
        # Read from the engine, not counted through the output_chunk hook: an observer of
        # chunks would keep ingestion in the server's process (docs/performance.md).
        read = getattr(manager, "output_bytes_read", None)
        if isinstance(read, int):
            yield CounterMetricFamily(
                "jobworker_output_spooled_bytes", "Job output bytes read from jobs", value=read
            )
        spool = getattr(manager, "spool_dir", None)
        if isinstance(spool, Path):
            yield from _spool_families(spool)


def _job_families(rows: list[Any]) -> Iterator[Any]:
    labels = ["job_id", "owner"]
    cpu = CounterMetricFamily(
        "jobworker_job_cpu_seconds", "CPU time used by the job so far", labels=labels
    )
    mem = GaugeMetricFamily("jobworker_job_memory_bytes", "Memory the job uses now", labels=labels)
    peak = GaugeMetricFamily(
        "jobworker_job_memory_peak_bytes", "Most memory the job used (cgroupv2)", labels=labels
    )
    rd = CounterMetricFamily("jobworker_job_io_read_bytes", "Block IO read", labels=labels)
    wr = CounterMetricFamily("jobworker_job_io_write_bytes", "Block IO written", labels=labels)
    pids = GaugeMetricFamily("jobworker_job_pids", "Processes of the job now", labels=labels)
    for status, sample in rows:
        values = [status.job_id, status.owner]
        cpu.add_metric(values, sample.cpu_usec / 1e6)
        if sample.memory_bytes is not None:  # unreadable: absent, never a false 0
            mem.add_metric(values, sample.memory_bytes)
        if sample.pids is not None:
            pids.add_metric(values, sample.pids)
        if sample.memory_peak_bytes is not None:
            peak.add_metric(values, sample.memory_peak_bytes)
        if sample.io_read_bytes is not None:
            rd.add_metric(values, sample.io_read_bytes)
        if sample.io_write_bytes is not None:
            wr.add_metric(values, sample.io_write_bytes)
    yield from (cpu, mem, peak, rd, wr, pids)


def _spool_families(spool: Path) -> Iterator[Any]:
    used = 0
    try:
        with os.scandir(spool) as entries:
            for entry in entries:
                try:
                    used += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass  # removed while we looked
        fs = os.statvfs(spool)
    except OSError:
        return
    yield GaugeMetricFamily("jobworker_spool_bytes", "Bytes of job output spooled", value=used)
    yield GaugeMetricFamily(
        "jobworker_spool_free_bytes",
        "Free bytes on the spool's file system (for the server's user)",
        value=fs.f_bavail * fs.f_frsize,
    )


class Metrics:
    """The plugin: one registry, one HTTP endpoint, per server."""

    #: One line for `jobworker plugins`.
    description = (
        "Prometheus metrics of jobs and the server on --metrics-listen (mutual TLS with"
        " --metrics-tls; needs jobworker[metrics])"
    )

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.manager: JobBackend | None = None
        self.address: str | None = None
        self._server: _Endpoint | None = None
        self._owners: set[str] = set()
        r = self.registry
        prometheus_client.ProcessCollector(registry=r)
        r.register(_ScrapeTime(self))
        self.started = prometheus_client.Counter(
            "jobworker_jobs_started",
            "Job starts by owner and outcome: started, or the refusal's gRPC code",
            ["owner", "outcome"],
            registry=r,
        )
        self.running = prometheus_client.Gauge(
            "jobworker_jobs_running", "Jobs whose command runs", registry=r
        )
        self.exits = prometheus_client.Counter(
            "jobworker_job_exits", "Jobs ended, by reason", ["reason"], registry=r
        )
        self.rpcs = prometheus_client.Histogram(
            "jobworker_rpc_duration_seconds",
            "Job service RPCs by method and gRPC status code, and how long they took",
            ["method", "code"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.streamed = prometheus_client.Counter(
            "jobworker_output_streamed_bytes", "Job output bytes sent to clients", registry=r
        )
        self.followers = prometheus_client.Gauge(
            "jobworker_followers_open", "StreamOutput calls in progress", registry=r
        )

    def _owner(self, owner: str) -> str:
        if owner in self._owners:
            return owner
        if len(self._owners) >= MAX_OWNERS:
            return OTHER_OWNER
        self._owners.add(owner)
        return owner

    # -- set-up --------------------------------------------------------------------------

    @hookimpl
    def jobworker_add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("metrics plugin")
        group.add_argument(
            "--metrics-listen",
            default=DEFAULT_LISTEN,
            metavar="HOST:PORT",
            help="where /metrics is served (default %(default)s; port 0: any free port)",
        )
        how = group.add_mutually_exclusive_group()
        how.add_argument(
            "--metrics-tls",
            action="store_true",
            help="serve HTTPS with the server's certificate; scrapers need a client "
            "certificate from the server's CA, on the authorization whitelist",
        )
        how.add_argument(
            "--metrics-plain-http",
            action="store_true",
            help="allow plain HTTP on a non-loopback address, on purpose",
        )

    @hookimpl
    def jobworker_configure(self, options: argparse.Namespace) -> None:
        host, port = _split(options.metrics_listen)
        if not (_is_loopback(host) or options.metrics_tls or options.metrics_plain_http):
            raise ConfigError(
                f"--metrics-listen {options.metrics_listen} is not a loopback address: add "
                "--metrics-tls (client certificates from the server's CA) or, to serve "
                "plain HTTP on purpose, --metrics-plain-http"
            )
        gate = _ScrapeGate.load(options) if options.metrics_tls else None
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            server = _Endpoint((str(sockaddr[0]), port), family, gate)
        except OSError as err:
            raise ConfigError(f"cannot serve metrics on {options.metrics_listen}: {err}") from err
        server.set_app(prometheus_client.make_wsgi_app(self.registry))
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._server = server
        bound_port = server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.address = f"{shown}:{bound_port}"
        log.info(
            "metrics_listening",
            address=self.address,
            url=f"{'https' if options.metrics_tls else 'http'}://{self.address}/metrics",
        )

    @hookimpl
    def jobworker_reload(self) -> Callable[[], None] | None:
        """SIGHUP: the CRL, whitelist and certificates of ``--metrics-tls`` follow the
        gRPC port's."""
        server = self._server
        if server is None or server.gate is None:
            return None
        return server.gate.prepare()

    @hookimpl
    def jobworker_metrics_registry(self) -> CollectorRegistry:
        return self.registry

    @hookimpl
    def jobworker_manager_ready(self, manager: JobBackend) -> None:
        self.manager = manager

    @hookimpl
    def jobworker_shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- observers -----------------------------------------------------------------------

    @hookimpl
    def jobworker_decision(
        self, identity: Identity, action: Action, job_id: str | None, allowed: bool
    ) -> None:
        if action is Action.START and not allowed:
            self.started.labels(self._owner(identity.name), "PERMISSION_DENIED").inc()

    @hookimpl
    def jobworker_start_refused(self, owner: str, spec: JobSpec, error: JobworkerError) -> None:
        self.started.labels(self._owner(owner), error.code).inc()

    @hookimpl
    def jobworker_job_started(self, status: JobStatus) -> None:
        self.started.labels(self._owner(status.owner), "started").inc()
        self.running.inc()

    @hookimpl
    def jobworker_on_exit(self, status: JobStatus) -> None:
        self.running.dec()
        if status.exit is not None:
            self.exits.labels(status.exit.reason.value).inc()

    @hookimpl
    def jobworker_rpc_started(self, method: str) -> None:
        if method == "StreamOutput":
            self.followers.inc()

    @hookimpl
    def jobworker_rpc_finished(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).observe(seconds)
        if method == "StreamOutput":
            self.followers.dec()

    @hookimpl
    def jobworker_output_sent(self, nbytes: int) -> None:
        self.streamed.inc(nbytes)

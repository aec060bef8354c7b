"""The jobworker server: mutual TLS, the job service, health and reflection, clean shutdown.

:func:`serve` runs until SIGTERM or SIGINT (or ``stop_event``), then stops accepting RPCs,
stops every job (grace, then kill), lets plugins release what they hold, removes the spool
directory it created, and returns normally.

SIGHUP reloads (:class:`Reloader`): the CRL, the server's certificates and every plugin's
files (the authz whitelist) are read again and put in force together, or, when one of them
fails to load, none is and the error names the file. Jobs are untouched; open streams
whose client the new CRL revokes end with UNAUTHENTICATED
(:mod:`jobworker.api.openstreams`).

Connections are bounded before authentication (:mod:`jobworker.api.connections`).
"""

from __future__ import annotations

# First: grpc reads how to refuse TLS 1.2 once, when it is imported (jobworker.api.grpcenv).
from jobworker.api.grpcenv import grpc  # isort: split

import asyncio
import errno
import functools
import inspect
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jobworker.api import tls
from jobworker.api.connections import PeerGate, raise_file_limit
from jobworker.api.service import SERVICE_NAME, DecodeInHandler, JobService
from jobworker.backends.base import JobBackend
from jobworker.backends.local.manager import JobManager
from jobworker.backends.local.spool import spool_run
from jobworker.config import SPOOL_SHARE_OF_FREE, SPOOL_SHARE_PER_CLIENT, ServerConfig, split_listen
from jobworker.errors import ConfigError, Unauthenticated
from jobworker.hooks.host import Plugins
from jobworker.v1 import jobworker_pb2_grpc

log = structlog.get_logger("jobworker.api.server")

#: Once every job is stopped, how long open RPCs (streams ending) get before cancellation.
RPC_DRAIN_SECONDS = 5.0


def _ensure_free(listen: str) -> None:
    """Raise ConfigError, in one line, when ``listen`` is taken: grpc would print its own
    C-core lines and a vague "Failed to bind" instead."""
    host, port = split_listen(listen)
    if port == 0:
        return
    bare = host.strip("[]")
    try:
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # grpc reports an unresolvable host itself
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"{listen} is already in use (another jobworker serve?); pick"
                        " another with --listen"
                    ) from None
                return  # not ours to explain (EADDRNOTAVAIL...): grpc's message follows


#: Builds the job engine of one server run, given its plugins and spool directory.
BackendFactory = Callable[[ServerConfig, Plugins, Path], JobBackend]


def local_backend(config: ServerConfig, plugins: Plugins, spool_dir: Path) -> JobBackend:
    """The default engine: jobs on this host
    (:class:`jobworker.backends.local.manager.JobManager`)."""
    budget = config.max_spool_bytes
    if budget is None:
        disk = os.statvfs(spool_dir)
        budget = int(disk.f_bavail * disk.f_frsize * SPOOL_SHARE_OF_FREE)
    per_client = config.max_spool_bytes_per_client
    if per_client is None:
        per_client = int(budget * SPOOL_SHARE_PER_CLIENT)
    log.info(
        "spool_budget",
        spool_dir=str(spool_dir),
        max_spool_bytes=budget,
        max_spool_bytes_per_client=per_client,
    )
    manager = JobManager(
        plugins,
        spool_dir,
        default_grace=config.default_grace,
        max_running=config.max_running,
        max_running_per_client=config.max_running_per_client,
        retain_finished=config.retain_finished,
        retain_seconds=config.retain_seconds,
        max_output_bytes=config.max_output_bytes,
        max_spool_bytes=budget,
        max_spool_bytes_per_client=per_client,
        live_restore=config.live_restore,
    )
    if config.live_restore:
        manager.restore()
    return manager


class _AuthenticateOtherServices(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Health and reflection get the job service's per-RPC certificate check (TLS 1.3, not
    revoked), so a revoked client gets nothing; they need no whitelist entry.

    The job service does its own check (see ``jobworker.api.service``). grpc.aio interceptors
    never see the servicer context, so the check wraps the handler itself.
    """

    def __init__(self, crl: tls.RevocationList | None, gate: PeerGate) -> None:
        self._crl = crl
        self._gate = gate

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        wrap = functools.partial(self._wrap, streaming=handler.response_streaming)
        return grpc.experimental.wrap_server_method_handler(wrap, handler)

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        try:
            tls.authenticate(context, self._crl)
        except Unauthenticated as err:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
        self._gate.authenticated(context.peer())

    def _wrap(self, behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._check(context)
            return await behavior(request, context)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._check(context)
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:  # a coroutine that answers with context.write()
                await result

        return stream if streaming else unary


@attrs.define
class Reloader:
    """What SIGHUP does: read the CRL, the server's certificates and the plugins' files
    again, then put all of them in force, or none.

    It also keeps the CRL's expiry warnings scheduled (``RevocationList.check_expiry``:
    a day before its next update time and at it), for each CRL put in force.
    """

    plugins: Plugins
    certificates: tls.ServerCertificates
    crl: tls.RevocationList | None
    #: Checks the open streams again once a reload is in force (a CRL may revoke them).
    recheck: Callable[[], None] = lambda: None
    _timers: list[asyncio.TimerHandle] = attrs.Factory(list)

    def reload(self) -> bool:
        """Reload; False (and an error log naming the file) when nothing was."""
        log.info("reload_requested")
        try:
            commits = [self.certificates.prepare()]
            if self.crl is not None:
                commits.append(self.crl.prepare())
            commits += self.plugins.reload()
        except ConfigError as err:
            log.error(
                "reload_failed",
                error=str(err),
                consequence="nothing was reloaded: the CRL, certificates and whitelist in "
                "force stay",
            )
            return False
        for commit in commits:
            commit()
        self.recheck()
        self.watch_crl()
        log.info("reload_done")
        return True

    def watch_crl(self) -> None:
        """(Re)schedule the expiry checks of the CRL in force."""
        self.cancel()
        if self.crl is None:
            return
        loop = asyncio.get_running_loop()
        now = datetime.now(UTC)
        for when in self.crl.warning_times:
            if when > now:
                delay = (when - now).total_seconds()
                self._timers.append(loop.call_later(delay, self.crl.check_expiry))
        self.crl.check_expiry()

    def cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()


@contextmanager
def _reload_on_sighup(reloader: Reloader) -> Iterator[None]:
    """SIGHUP reloads (only the main thread can own signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reloader.reload)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        # While its jobs stop, a late SIGHUP must not kill the server.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


@contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop``; only the main thread can own signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def serve(
    config: ServerConfig,
    plugins: Plugins,
    *,
    backend: BackendFactory = local_backend,
    ready: Callable[[str], None] | None = None,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Run the server until SIGTERM/SIGINT or ``stop_event``; ``plugins`` are configured.

    ``backend`` builds the job engine (jobs on this host by default) unless a plugin
    provides one (``jobworker_make_backend``, e.g. the ``ray`` plugin). ``ready`` is called
    with the address actually listened on (the port resolved when ``listen`` asks for
    port 0) once RPCs are accepted. Raises ``ConfigError`` before
    listening for bad TLS files, a CRL that does not verify, no authorization plugin, or an
    address that cannot be bound.
    """
    plugins.check_essential()
    stop = stop_event or asyncio.Event()
    # Handlers first: a SIGTERM during start-up stops the server cleanly once it runs.
    with _stop_on_signals(stop):
        await _serve_until(stop, config, plugins, backend, ready)


async def _serve_until(
    stop: asyncio.Event,
    config: ServerConfig,
    plugins: Plugins,
    backend: BackendFactory,
    ready: Callable[[str], None] | None,
) -> None:
    host, _ = split_listen(config.listen)
    certificates = await asyncio.to_thread(tls.ServerCertificates, config.tls)
    crl = None if config.tls.crl is None else tls.RevocationList(config.tls.crl, config.tls.ca)
    reloader = Reloader(plugins, certificates, crl)

    with spool_run(config.spool_dir, live=config.live_restore) as spool_dir:
        jobs = await plugins.make_backend(config, spool_dir) or backend(config, plugins, spool_dir)
        # Without so_reuseport 0, grpc lets a second server share a busy port and the
        # kernel splits connections between them.
        limits = raise_file_limit(config.connections, config.max_running)
        gate = PeerGate(limits.max_connections_per_peer)
        server = grpc.aio.server(
            interceptors=[_AuthenticateOtherServices(crl, gate), DecodeInHandler()],
            options=[("grpc.so_reuseport", 0), *limits.grpc_options()],
        )
        service = JobService(
            jobs,
            plugins,
            crl,
            max_streams_per_client=config.max_streams_per_client,
            authenticated=gate.authenticated,
        )
        reloader.recheck = service.open_streams.recheck
        jobworker_pb2_grpc.add_JobServiceServicer_to_server(service, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        _ensure_free(config.listen)
        try:
            port = server.add_secure_port(config.listen, certificates.credentials)
        except RuntimeError as err:
            raise ConfigError(f"cannot listen on {config.listen}: {err}") from None
        if not port:
            raise ConfigError(f"cannot listen on {config.listen}: address in use or not local")
        address = f"{host}:{port}"

        plugins.manager_ready(jobs)
        await server.start()
        gate.start(port)
        reloader.watch_crl()
        try:
            await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            _log_started(config, plugins, address, spool_dir)
            if ready is not None:
                ready(address)
            with _reload_on_sighup(reloader):
                await stop.wait()
            log.info("server_stopping", address=address)
        finally:
            reloader.cancel()
            await gate.stop()
            await health_servicer.enter_graceful_shutdown()
            # New RPCs are refused at once; streams of running jobs end as the jobs stop.
            stopping = asyncio.ensure_future(server.stop(config.default_grace + RPC_DRAIN_SECONDS))
            try:
                await jobs.shutdown()
            finally:
                await stopping
                plugins.shutdown()
    log.info("server_stopped", address=address)


def _log_started(config: ServerConfig, plugins: Plugins, address: str, spool_dir: Path) -> None:
    files = config.tls
    log.info(
        "server_started",
        address=address,
        pid=os.getpid(),
        plugins=[row["name"] for row in plugins.describe()],
        tls_cert=str(files.cert),
        tls_key=str(files.key),
        tls_ca=str(files.ca),
        tls_crl=None if files.crl is None else str(files.crl),
        spool_dir=str(spool_dir),
    )
    if not plugins.has_impl("jobworker_limits_apply"):
        log.warning(
            "jobs_uncontained",
            reason="no plugin implements jobworker_limits_apply",
            consequence="jobs run in a process group: no resource limits, and a process "
            "that calls setsid escapes stop; load --plugin cgroupv2",
        )

"""An in-process jobworker server for tests: real mTLS on 127.0.0.1, real processes.

``running_server`` runs :func:`jobworker.api.server.serve` on its own event loop in a thread,
the way ``jobworker serve`` runs it, and stops it through ``stop_event``. Clients are plain
(synchronous) grpc channels in the test's thread, one per identity of the test PKI:

* ``alice`` and ``bob``: role user; ``root``: role admin;
* ``mallory``: a valid certificate of the same CA, but not on the whitelist.

grpc must be imported after ``jobworker.api.tls`` (tests/integration/conftest.py sees to it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import grpc

from jobworker.api.pki import PkiPaths, init_pki
from jobworker.api.server import serve
from jobworker.api.tlsfiles import TlsFiles
from jobworker.config import ServerConfig
from jobworker.hooks.host import ESSENTIAL_PLUGINS, Plugins
from jobworker.plugins.authz import Authz
from jobworker.plugins.isolation import Isolation
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.jobpaths import JOB_VISIBLE_ROOT

RPC_TIMEOUT_S = 10.0
START_TIMEOUT_S = 120.0  # a deadline for a failure, not a target: a loaded machine is slow
STOP_TIMEOUT_S = 60.0

WHITELISTED = (("alice", "user"), ("bob", "user"), ("root", "admin"))
NOT_WHITELISTED = "mallory"

_T = TypeVar("_T")


def make_api_pki(directory: Path) -> PkiPaths:
    """The test PKI: every client has a certificate; the whitelist leaves out mallory."""
    paths = init_pki(directory, clients=[*WHITELISTED, (NOT_WHITELISTED, "user")])
    entries = "".join(
        f'[[clients]]\nidentity = "{name}"\nrole = "{role}"\n\n' for name, role in WHITELISTED
    )
    paths.authz.write_text(entries)
    return paths


def authz_plugins(whitelist: Path) -> Plugins:
    """Plugins as ``jobworker serve --authz FILE`` loads them (no containment plugin):
    the whitelist, and isolation with its defaults (jobs run as nobody, in namespaces)."""
    plugins = Plugins()
    plugins.register(Authz.from_file(whitelist), name="authz")
    plugins.register(Isolation(writable=(str(JOB_VISIBLE_ROOT),)), name="isolation")
    plugins.load(ESSENTIAL_PLUGINS)
    return plugins


@attrs.define
class RunningServer:
    """A server running on a loop in another thread."""

    address: str
    loop: asyncio.AbstractEventLoop
    pki: PkiPaths
    _stop: asyncio.Event
    _thread: threading.Thread
    _channels: list[grpc.Channel] = attrs.Factory(list)
    _by_name: dict[str, grpc.Channel] = attrs.Factory(dict)

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(RPC_TIMEOUT_S)

    def channel(self, name: str | None = None, credentials: Any = None) -> grpc.Channel:
        """Client ``name``'s channel, one per name as a client keeps one (a shared server
        bounds the connections from one address), or a new one with raw ``credentials``;
        closed at stop."""
        if credentials is None:
            assert name is not None
            if name not in self._by_name:
                self._by_name[name] = self.channel(
                    credentials=client_credentials(self.pki.client(name))
                )
            return self._by_name[name]
        channel = grpc.secure_channel(self.address, credentials)
        self._channels.append(channel)
        return channel

    def stub(self, name: str) -> pb_grpc.JobServiceStub:
        return pb_grpc.JobServiceStub(self.channel(name))

    def stop(self) -> None:
        """Stop as SIGTERM would, wait until ``serve`` has returned, close the channels."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(STOP_TIMEOUT_S)
        assert not self._thread.is_alive(), "serve() did not return after stop_event"
        for channel in self._channels:
            channel.close()

    @property
    def stopped(self) -> bool:
        return not self._thread.is_alive()


def client_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca.read_bytes(),
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )


@contextmanager
def running_server(
    pki: PkiPaths,
    *,
    listen: str = "127.0.0.1:0",
    crl: Path | None = None,
    plugins: Plugins | None = None,
    spool_dir: Path | None = None,
    default_grace: float = 5.0,
    **config_fields: Any,
) -> Iterator[RunningServer]:
    """Serve (by default on an ephemeral port of 127.0.0.1) until the block exits;
    ``config_fields`` are more :class:`ServerConfig` fields (``max_running=2``...).

    ``config_fields`` go to :class:`ServerConfig` as they are (``max_output_bytes=...``).
    Raises what ``serve`` raised, at start-up or when it returns.
    """
    server_files = pki.server()._replace(crl=crl)
    config = ServerConfig(
        listen=listen,
        tls=server_files,
        spool_dir=spool_dir,
        default_grace=default_grace,
        **config_fields,
    )
    plugins = plugins or authz_plugins(pki.authz)
    ready = threading.Event()
    started: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        started["loop"], started["stop"] = asyncio.get_running_loop(), stop

        def on_ready(address: str) -> None:
            started["address"] = address
            ready.set()

        await serve(config, plugins, ready=on_ready, stop_event=stop)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            started["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="jobworker-test-server", daemon=True)
    thread.start()
    assert ready.wait(START_TIMEOUT_S), "server did not start"
    if "error" in started:
        thread.join()
        raise started["error"]
    server = RunningServer(
        address=started["address"],
        loop=started["loop"],
        pki=pki,
        stop=started["stop"],
        thread=thread,
    )
    try:
        yield server
    finally:
        server.stop()
    if "error" in started:
        raise started["error"]


def start_job(stub: pb_grpc.JobServiceStub, command: str, *args: str, **fields: Any) -> str:
    reply = stub.StartJob(
        pb.StartJobRequest(command=command, args=args, **fields), timeout=RPC_TIMEOUT_S
    )
    job_id: str = reply.job_id
    return job_id


def wait_exited(stub: pb_grpc.JobServiceStub, job_id: str) -> pb.JobStatusResponse:
    """Follow the output to its end (the job is over then), and return the final status."""
    for _ in stub.StreamOutput(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S):
        pass
    status: pb.JobStatusResponse = stub.GetStatus(
        pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S
    )
    return status


def output_of(stub: pb_grpc.JobServiceStub, job_id: str, **fields: Any) -> list[tuple[str, bytes]]:
    return [
        (chunk.stream, chunk.data)
        for chunk in stub.StreamOutput(
            pb.JobRequest(job_id=job_id, **fields), timeout=RPC_TIMEOUT_S
        )
    ]

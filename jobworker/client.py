"""A small typed client for the jobworker API; the CLI uses it and so can you::

    from jobworker.client import JobClient
    from jobworker.api.tlsfiles import TlsFiles

    with JobClient("127.0.0.1:50051", TlsFiles("alice.pem", "alice.key", "ca.pem")) as jobs:
        job_id = jobs.start("sh", ["-c", "echo hi"])
        for stream, data, offset in jobs.stream(job_id):
            print(stream, data)
        print(jobs.status(job_id).exit_code)

Protobuf stays in this module: callers get attrs views and :mod:`jobworker.model` values.
Every failed call raises the :mod:`jobworker.errors` class of its gRPC status code, with the
server's message, so callers never handle ``grpc.RpcError``.

Starting a job and following it to its end (``jobworker run``) speak protobuf through
:mod:`jobworker.api.codec`, by hand; the generated classes, the model and attrs are
imported by the first call that needs them, so a client that runs one job pays for grpc
and little more (docs/performance.md, "The client's start-up").
"""

from __future__ import annotations

# First: grpc reads process-wide settings once, when it is imported (jobworker.api.grpcenv).
from jobworker.api.grpcenv import grpc  # isort: split

import builtins
import functools
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from jobworker import errors
from jobworker.api import codec, direct
from jobworker.api.codec import JobEnd
from jobworker.api.tlsfiles import TlsFiles, load_material

if TYPE_CHECKING:
    from jobworker.jobspec import Limits
    from jobworker.model import InputResult, JobState, JobStatusView, StopView
    from jobworker.usage import JobUsage
    from jobworker.v1 import jobworker_pb2 as pb
    from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

__all__ = ["MAX_MESSAGE_BYTES", "JobClient", "JobEnd", "JobStatusView", "StopView"]

#: The service's methods, for calls made with bytes (:mod:`jobworker.api.codec`).
_SERVICE = "/jobworker.v1.JobService"

#: Largest message accepted either way; well above the server's output chunks, small
#: enough that a misbehaving server cannot make the client allocate without bound.
MAX_MESSAGE_BYTES = 64 << 20
#: The largest request a server accepts: grpc's default receive limit, which it keeps.
MAX_REQUEST_BYTES = 4 << 20
#: Jobs per ListJobs page: a page of full statuses stays far below MAX_MESSAGE_BYTES.
LIST_PAGE_SIZE = 500
_IDEMPOTENT = ("GetStatus", "ListJobs", "StopJob", "StreamOutput", "GetUsage", "ListUsage")


def failover_service_config() -> str:
    """The channel's service config for a target naming several servers (a cluster's
    front servers, docs/cluster.md): keep to one (``pick_first``: a job started through
    it is known there at once) until it goes down, then take the next; calls that change
    nothing (and StopJob, which answers a finished job without error) are tried again."""
    import json  # only for such targets: the light client does not pay for it otherwise

    retry = {
        "maxAttempts": 4,
        "initialBackoff": "0.2s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    methods = [{"service": "jobworker.v1.JobService", "method": m} for m in _IDEMPOTENT]
    return json.dumps(
        {
            "loadBalancingConfig": [{"pick_first": {}}],
            "methodConfig": [{"name": methods, "retryPolicy": retry}],
        }
    )


def unavailable_message(target: str, details: str, server_name: str | None = None) -> str:
    """One line a person can act on for grpc's UNAVAILABLE ``details`` (C-core words)."""
    lowered = details.lower()
    if "hostname verification" in lowered:  # the chain is good, the names are not
        host = server_name or target.rsplit(":", 1)[0].strip("[]")
        return (
            f"the server at {target} has a certificate that does not name the host dialled"
            f" ({host}): dial a name it lists, or re-issue it with `jobworker certs"
            " renew-server --host NAME --ip ADDR`"
        )
    if "certificate_verify_failed" in lowered or "peer name" in lowered:
        return (
            f"the server at {target} has a certificate this client does not trust: it is not"
            " signed by --tls-ca (JOBWORKER_TLS_CA), or does not name the host dialled"
            " (check the address, or the server's certificate names)"
        )
    # The server closed before its side of the handshake: over its connection limits.
    if "handshake read failed" in lowered or "handshake write failed" in lowered:
        return (
            f"the server at {target} is busy: it closed the connection before the TLS"
            " handshake ended (it is at its connection limit); try again shortly"
        )
    # After the client's side of a TLS 1.3 handshake: a refused certificate looks the same
    # as a connection the server closed for its per-address limit.
    if "socket closed" in lowered or "handshake" in lowered or "ssl" in lowered:
        return (
            f"the server at {target} closed the connection after the TLS handshake: it is"
            " busy (at its connection limit for this address; try again shortly), or it"
            " refused this client's certificate (--tls-cert, JOBWORKER_TLS_CERT, not signed"
            " by the server's CA, expired, or not a client certificate)"
        )
    return (
        f"no jobworker server answers at {target} (is `jobworker serve` running? is"
        " JOBWORKER_SERVER right?)"
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Client credentials: present ``cert``, verify the server's certificate against ``ca``.

    grpc checks the server's name against the target host name (or the
    ``grpc.ssl_target_name_override`` channel option). Raises ``ConfigError`` for unusable
    files (:func:`jobworker.api.tlsfiles.load_material`).
    """
    material = load_material(files)
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca,
        private_key=material.key,
        certificate_chain=material.cert_chain,
    )


class JobClient:
    """A connection to a jobworker server, authenticated by a client certificate.

    ``target`` is ``HOST:PORT``, or a gRPC target naming several servers (a cluster's
    fronts: ``ipv4:ADDR:PORT,ADDR:PORT``, ``dns:///NAME:PORT``; see
    :func:`jobworker.api.address.dial_target`), of which one is used until it fails.
    ``server_name`` overrides the name checked against the server's certificate (by
    default the host part of ``target``). ``direct_output``: where the server offers it
    (a cluster's front), read a job's output from the node that runs it, falling back to
    the server when the node cannot be reached (docs/cluster.md, "Direct output"). Use it
    as a context manager, or call ``close``.
    Raises :class:`jobworker.errors.ConfigError` at construction for unusable TLS files.
    """

    def __init__(
        self,
        target: str,
        tls: TlsFiles,
        *,
        server_name: str | None = None,
        direct_output: bool = True,
    ) -> None:
        self.target = target
        #: Ask to read output from the job's node where the server offers it.
        self._direct_output = direct_output
        self._nodes = direct.NodeChannels(tls, MAX_MESSAGE_BYTES)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if server_name is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        if "," in target or target.startswith("dns:"):
            options.append(("grpc.service_config", failover_service_config()))
        self.server_name = server_name
        self._channel = grpc.secure_channel(target, channel_credentials(tls), options=options)
        self._start_job = self._channel.unary_unary(f"{_SERVICE}/StartJob")
        # Chunks as raw bytes, decoded by hand (codec.decode_chunk): every byte passes here.
        self._stream_output = self._channel.unary_stream(f"{_SERVICE}/StreamOutput")

    @functools.cached_property
    def _stub(self) -> pb_grpc.JobServiceStub:
        """The generated stub, for the calls ``run`` does not make: protobuf's runtime is
        imported on first use."""
        from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

        return pb_grpc.JobServiceStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()
        self._nodes.close()

    def _error(self, err: grpc.RpcError) -> errors.JobworkerError:
        """The jobworker error for a failed call: same status code, the server's message."""
        code: grpc.StatusCode = err.code()
        details = err.details() or code.name
        if code is grpc.StatusCode.UNAVAILABLE:
            return errors.Unavailable(unavailable_message(self.target, details, self.server_name))
        return errors.error_from_code(code.name, details)

    def start(
        self,
        command: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        limits: Limits | None = None,
        user: str | None = None,
        network: str | None = None,
        stdin: bool = False,
        node: str | None = None,
    ) -> str:
        """Start ``command`` and return the job id; ``env`` is the job's whole environment.

        ``user``: the Unix account to run as (None: the client's default); ``network``:
        "private", "none" or "host" (None: the server's default); ``stdin``: keep the job's stdin
        open for :meth:`write_input` (else it reads /dev/null); ``node``: the cluster node
        to run on (cluster backends only)."""
        request = codec.start_request(command, args, env, cwd, limits, user, network, stdin, node)
        if (size := len(request)) > MAX_REQUEST_BYTES:
            raise errors.InvalidArgument(
                f"the command, its arguments and environment take {size / (1 << 20):.1f} MiB,"
                f" over the {MAX_REQUEST_BYTES >> 20} MiB a request may carry: pass large data"
                " through the job's stdin (`jobworker run`, a pipe or -i) or a file"
            )
        try:
            response: bytes = self._start_job(request)
        except grpc.RpcError as err:
            raise self._error(err) from None
        return codec.start_response_job_id(response)

    def status(self, job_id: str) -> JobStatusView:
        from jobworker.api import wire
        from jobworker.v1 import jobworker_pb2 as pb

        try:
            response: pb.JobStatusResponse = self._stub.GetStatus(pb.JobRequest(job_id=job_id))
        except grpc.RpcError as err:
            raise self._error(err) from None
        return wire.status_from_pb(response)

    def stop(self, job_id: str, grace: float | None = None) -> StopView:
        """Stop a job: SIGTERM, ``grace`` seconds (server default if None), then SIGKILL."""
        from jobworker.api import wire
        from jobworker.v1 import jobworker_pb2 as pb

        try:
            response: pb.JobResponse = self._stub.StopJob(
                pb.JobRequest(job_id=job_id, grace_seconds=grace)
            )
        except grpc.RpcError as err:
            raise self._error(err) from None
        return wire.stop_from_pb(response)

    def list(
        self,
        state: JobState | None = None,
        owner: str | None = None,
        node: str | None = None,
    ) -> builtins.list[JobStatusView]:
        """Every job the caller may see (its own; all of them for an admin), oldest first,
        only those in ``state``, of ``owner`` and on cluster node ``node`` when given; fetched
        a page at a time."""
        import attrs

        from jobworker.api import wire
        from jobworker.model import ListQuery

        query = ListQuery(state=state, owner=owner, node=node, page_size=LIST_PAGE_SIZE)
        views: builtins.list[JobStatusView] = []
        while True:
            try:
                response: pb.ListJobsResponse = self._stub.ListJobs(wire.list_request(query))
            except grpc.RpcError as err:
                raise self._error(err) from None
            views += [wire.status_from_pb(job) for job in response.jobs]
            if not response.next_page_token:
                # A server older than the filters ignores them: filter here as well.
                return [
                    v
                    for v in views
                    if (state is None or v.state is state)
                    and owner in (None, v.owner)
                    and node in (None, v.node)
                ]
            query = attrs.evolve(query, page_token=response.next_page_token)

    def write_input(self, job_id: str, chunks: Iterable[bytes], eof: bool = True) -> InputResult:
        """Write ``chunks`` to the job's stdin, then close it (unless ``eof`` is False).

        Blocks while the job does not read (flow control reaches back to ``chunks``);
        returns early, with ``closed`` set, when the job closes its stdin or exits.
        """
        from jobworker.api import wire
        from jobworker.v1 import jobworker_pb2 as pb

        def messages() -> Iterator[pb.InputChunk]:
            yield pb.InputChunk(job_id=job_id)
            for data in chunks:
                if data:
                    yield pb.InputChunk(data=data)
            if eof:
                yield pb.InputChunk(eof=True)

        try:
            response: pb.WriteInputResponse = self._stub.WriteInput(messages())
        except grpc.RpcError as err:
            raise self._error(err) from None
        return wire.input_result_from_pb(response)

    def usage(self, job_id: str, last: int = 0) -> JobUsage:
        """The job's usage samples, oldest first (the newest ``last`` only; 0: all)."""
        from jobworker.api import wire
        from jobworker.v1 import jobworker_pb2 as pb

        try:
            response: pb.JobUsage = self._stub.GetUsage(pb.UsageRequest(job_id=job_id, last=last))
        except grpc.RpcError as err:
            raise self._error(err) from None
        return wire.usage_from_pb(response)

    def running_usage(self, last: int = 0) -> builtins.list[JobUsage]:
        """Usage samples of every running job the caller may see."""
        from jobworker.api import wire
        from jobworker.v1 import jobworker_pb2 as pb

        try:
            response: pb.ListUsageResponse = self._stub.ListUsage(pb.ListUsageRequest(last=last))
        except grpc.RpcError as err:
            raise self._error(err) from None
        return [wire.usage_from_pb(job) for job in response.jobs]

    def stream(
        self, job_id: str, offset: int = 0, follow: bool = True
    ) -> Generator[tuple[str, bytes, int], None, None]:
        """Yield ``(stream, data, offset)`` chunks; ``stream`` is "stdout" or "stderr".

        Starts after ``offset`` (the last offset received, to resume). With ``follow`` the
        iterator ends when the job has ended and all its output was sent; without, it ends
        after the output that exists now. Closing the iterator early cancels the call.
        Raises DataLoss where the job's output was cut (see docs/api.md).
        """
        chunks = self.stream_views(job_id, offset, follow)
        try:
            for stream, data, position in chunks:
                yield stream, bytes(data), position
        finally:
            chunks.close()

    def stream_views(
        self, job_id: str, offset: int = 0, follow: bool = True
    ) -> Generator[tuple[str, memoryview, int], None, None]:
        """As :meth:`stream`, with ``data`` a view into the received message: no copy, for
        a caller that only writes it out (``jobworker logs`` does)."""
        yield from self._output(job_id, offset, follow)

    def follow_to_end(
        self, job_id: str, offset: int = 0
    ) -> Generator[tuple[str, memoryview, int], None, JobEnd]:
        """As :meth:`stream_views`, following; the generator returns how the job ended
        (``jobworker run``): the server sends it after the output, in the same call (a
        server from before that feature is asked with :meth:`status`)."""
        end = yield from self._output(job_id, offset, True, with_status=True)
        if end is not None:
            return end
        view = self.status(job_id)
        reason = "" if view.reason is None else view.reason.value
        return JobEnd(job_id, view.state.value, reason, view.shell_exit_code, view.node or "")

    def _output(
        self, job_id: str, offset: int, follow: bool, with_status: bool = False
    ) -> Generator[tuple[str, memoryview, int], None, JobEnd | None]:
        """The chunks of a job's output from ``offset``; returns the job's end if asked
        ``with_status`` and the server sent it.

        Where the server redirects to the job's node (a cluster's direct output), the
        chunks come from there; if the node cannot be reached (or the stream from it is
        cut) the rest comes through the server, from the last offset received."""
        ask_node = self._direct_output
        while True:
            request = codec.job_request(
                job_id, offset, no_follow=not follow, with_status=with_status, direct_ok=ask_node
            )
            got = yield from self._chunks(self._stream_output(request))
            if not isinstance(got, codec.Redirect):
                return got
            ask_node = False  # once: what the node did not send comes through the server
            try:
                from_node = self._nodes.call(got, job_id, offset, follow)
                for stream, data, position in self._chunks(from_node, from_node=True):
                    yield stream, data, position
                    offset = position
            except direct.NodeUnreachable:
                continue
            if not (follow and with_status):
                return None
            # The job's end, from the server: its stream from here holds only that.

    def _chunks(
        self, call: Any, from_node: bool = False
    ) -> Generator[tuple[str, memoryview, int], None, JobEnd | codec.Redirect | None]:
        """The chunks of one StreamOutput ``call``; returns the job's end if the server sent
        it, or where to read the output instead if it redirected the call. A call to a
        node (``from_node``) that fails as the server could make up for raises
        :class:`~jobworker.api.direct.NodeUnreachable`."""
        end: JobEnd | codec.Redirect | None = None
        try:
            for raw in call:
                chunk = codec.decode_chunk(raw)
                if chunk.redirect is not None:
                    end = codec.decode_redirect(chunk.redirect)
                elif chunk.status is not None:  # the last message: read on to the call's end
                    end = codec.decode_end(chunk.status)
                else:
                    yield chunk.stream, chunk.data, chunk.offset
            return end
        except grpc.RpcError as err:
            if from_node and err.code() in direct.NODE_RETRIED:
                raise direct.NodeUnreachable from None
            raise self._error(err) from None
        finally:
            call.cancel()  # no-op after a complete stream; frees the server otherwise


def __getattr__(name: str) -> object:
    """The model's views, re-exported on first use (importing them imports attrs)."""
    if name in ("JobStatusView", "StopView"):
        from jobworker import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

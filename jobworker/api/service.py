"""The gRPC servicer: the only place protobuf meets the domain.

Every RPC goes through one admission step (:class:`_Admission`) before its handler runs:

1. the caller's identity, from the TLS auth context only (``tls.check_peer``: verified
   client certificate within its validity dates, TLS 1.3, not revoked), else
   UNAUTHENTICATED; a stream stays under watch until it ends
   (:class:`jobworker.api.openstreams.OpenStreams`);
2. for RPCs about a job, the job is looked up, and an unknown id is authorized with
   ``job=None`` first, so a client that may do nothing gets PERMISSION_DENIED rather than
   learning which ids exist;
3. ``plugins.authorize`` (raises on deny), then the ``decision`` observer and a log line,
   allowed or not;
4. for an unknown id, NOT_FOUND.

Errors leave through one table (:func:`jobworker.errors.wire_code`); anything that is not
a :class:`JobworkerError` is a bug, logged here with its traceback and reported to the
client as INTERNAL "internal error".
"""

from __future__ import annotations

# First: grpc reads how to refuse TLS 1.2 once, when it is imported (jobworker.api.grpcenv).
from jobworker.api.grpcenv import grpc  # isort: split

import collections
import contextlib
import functools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import attrs
import structlog

from jobworker.api import codec, tls, wire
from jobworker.api.identity import Identity
from jobworker.api.openstreams import OpenStreams
from jobworker.backends.base import JobBackend
from jobworker.backends.local import memtrim
from jobworker.errors import (
    FailedPrecondition,
    InvalidArgument,
    JobworkerError,
    NotFound,
    ResourceExhausted,
    job_not_found,
    wire_code,
)
from jobworker.hooks.host import Plugins
from jobworker.model import Action, InputChunk, JobStatus
from jobworker.usage import UsageSource
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

log = structlog.get_logger("jobworker.api.service")

#: Actions about one existing job; the others (start, list) are about no job.
_JOB_ACTIONS = frozenset({Action.STOP, Action.STATUS, Action.STREAM, Action.WRITE})

#: Job ids are URL-safe tokens (``model.new_job_id``); anything else cannot exist.
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _check_job_id(job_id: str) -> None:
    """An id that ``model.new_job_id`` cannot have produced names no job."""
    if not job_id:
        raise NotFound("job_id is empty: pass the id StartJob returned")
    if not _JOB_ID.fullmatch(job_id):
        shown = job_id[:64] + ("..." if len(job_id) > 64 else "")
        raise NotFound(
            f"no job with id {shown!r}: job ids are up to 64 letters, digits, '-' and '_'"
        )


# -- admission: identity, authorization, errors --------------------------------------------


@attrs.frozen
class Caller:
    """Who an admitted RPC runs for, and the job it is about (job RPCs only)."""

    identity: Identity
    owner: str
    #: The client's leaf certificate (PEM), which open streams keep checking.
    certificate: bytes
    job: JobStatus | None = None

    @property
    def target(self) -> JobStatus:
        """The job of a job RPC; admission has already answered NOT_FOUND for unknown ids."""
        if self.job is None:
            raise TypeError("target is only set for RPCs about a job")
        return self.job


@attrs.frozen
class Undecodable:
    """Stands for a request whose bytes are not the RPC's protobuf message."""

    error: str


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or anything a malformed message provokes
            return Undecodable(str(exc) or type(exc).__name__)

    return parse


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name


class DecodeInHandler(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Let the job service answer undecodable requests itself.

    grpc.aio decodes a request before any handler runs and answers a failure with UNKNOWN.
    This swaps in a decoder that hands the handler an :class:`Undecodable` instead, so the
    caller is authenticated and authorized first and then told INVALID_ARGUMENT. It also
    lets StreamOutput send the chunks it encodes itself.
    """

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if details.method == f"/{SERVICE_NAME}/StreamOutput":
            handler = handler._replace(response_serializer=_pre_encoded)
        return handler


def _pre_encoded(message: bytes | Any) -> bytes:
    """StreamOutput's chunks arrive encoded already (:func:`jobworker.api.codec.encode_chunk`)."""
    if isinstance(message, bytes):
        return message
    encoded: bytes = message.SerializeToString()
    return encoded


class _Admission:
    """``async with`` around one RPC: admits the caller, maps every error to a status."""

    def __init__(
        self,
        service: JobService,
        rpc: str,
        action: Action,
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self._service = service
        self._rpc = rpc
        self._action = action
        self._request = request
        self._context = context
        self._began = time.monotonic()

    def _finished(self, code: str) -> None:
        if self._service.observe_rpcs:
            self._service.plugins.rpc_finished(self._rpc, code, time.monotonic() - self._began)

    async def __aenter__(self) -> Caller:
        if self._service.observe_rpcs:
            self._service.plugins.rpc_started(self._rpc)
        try:
            return self._admit()
        except Exception as exc:
            await self._abort(exc)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Not an Exception: cancellation or generator exit (the client went away).
        if isinstance(exc, Exception):
            await self._abort(exc)
        self._finished("OK" if exc is None else "CANCELLED")

    async def _abort(self, exc: Exception) -> None:
        """End the RPC with the status ``exc`` maps to (``context.abort`` raises)."""
        name = wire_code(exc)
        if name is not None:
            code, message = grpc.StatusCode[name], str(exc)
            log.info("rpc_refused", code=code.name, message=message)
        else:
            code, message = grpc.StatusCode.INTERNAL, "internal error"
            log.error("rpc_internal_error", exc_info=exc)
        self._finished(code.name)
        await self._context.abort(code, message)

    def _admit(self) -> Caller:
        # Each RPC runs in its own task, so these bindings end with it.
        structlog.contextvars.bind_contextvars(rpc=self._rpc)
        service = self._service
        identity = tls.authenticate(self._context, service.crl)
        certificate = tls.peer_certificate(self._context.auth_context())
        service.authenticated(self._context.peer())
        owner = service.plugins.principal(identity)
        structlog.contextvars.bind_contextvars(identity=owner)
        job_id: str | None = None
        job: JobStatus | None = None
        undecodable = isinstance(self._request, Undecodable)
        if self._action in _JOB_ACTIONS and not undecodable:
            job_id = self._request.job_id
            structlog.contextvars.bind_contextvars(job_id=job_id[:64])
            job = service.backend.find(job_id)
        try:
            service.plugins.authorize(identity, self._action, job)
        except JobworkerError as err:
            self._decided(identity, job_id, allowed=False, reason=str(err))
            raise
        self._decided(identity, job_id, allowed=True, reason="allowed")
        if isinstance(self._request, Undecodable):
            raise InvalidArgument(
                f"the request is not a valid {self._rpc} message ({self._request.error});"
                " use a client generated from jobworker/v1/jobworker.proto"
            )
        if job_id is not None and job is None:
            _check_job_id(job_id)
            raise job_not_found(job_id)
        return Caller(identity=identity, owner=owner, certificate=certificate, job=job)

    def _decided(self, identity: Identity, job_id: str | None, allowed: bool, reason: str) -> None:
        self._service.plugins.decision(identity, self._action, job_id, allowed, reason)
        log.info(
            "authz_decision",
            identity=identity.name,
            names=identity.names,
            action=self._action.value,
            job_id=job_id,
            allowed=allowed,
            reason=reason,
        )


_Service = TypeVar("_Service", bound="JobService")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _unary(
    action: Action,
) -> Callable[
    [Callable[[_Service, _Req, Caller], Awaitable[_Resp]]],
    Callable[[_Service, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]],
]:
    """Make ``impl(self, request, caller)`` a unary-response handler, admitted first."""

    def decorate(
        impl: Callable[[_Service, _Req, Caller], Awaitable[_Resp]],
    ) -> Callable[[_Service, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]:
        @functools.wraps(impl)
        async def handler(
            self: _Service, request: _Req, context: grpc.aio.ServicerContext
        ) -> _Resp:
            async with _Admission(self, impl.__name__, action, request, context) as caller:
                return await impl(self, request, caller)

        return handler

    return decorate


def _streaming(
    action: Action,
) -> Callable[
    [Callable[[_Service, _Req, Caller], AsyncIterator[_Resp]]],
    Callable[[_Service, _Req, grpc.aio.ServicerContext], AsyncIterator[_Resp]],
]:
    """Make ``impl(self, request, caller)`` (an async generator) a streaming handler."""

    def decorate(
        impl: Callable[[_Service, _Req, Caller], AsyncIterator[_Resp]],
    ) -> Callable[[_Service, _Req, grpc.aio.ServicerContext], AsyncIterator[_Resp]]:
        @functools.wraps(impl)
        async def handler(
            self: _Service, request: _Req, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[_Resp]:
            async with _Admission(self, impl.__name__, action, request, context) as caller:
                with self.open_streams.guard(caller.certificate, caller.identity.name) as open_:
                    items = impl(self, request, caller)
                    # Close the source (and the follower it holds) as soon as the client goes.
                    async with contextlib.aclosing(items):  # type: ignore[type-var]
                        while True:
                            open_.check()
                            open_.waiting = True
                            try:
                                item = await anext(items)
                            except StopAsyncIteration:
                                break
                            open_.waiting = False  # grpc sends it: see OpenStreams
                            yield item

        return handler

    return decorate


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


# -- the service ----------------------------------------------------------------------------


class JobService(pb_grpc.JobServiceServicer):
    """``jobworker.v1.JobService`` over a :class:`jobworker.backends.base.JobBackend`."""

    def __init__(
        self,
        backend: JobBackend,
        plugins: Plugins,
        crl: tls.RevocationList | None = None,
        *,
        max_streams_per_client: int | None = None,
        authenticated: Callable[[str], None] = lambda peer: None,
    ) -> None:
        self.backend = backend
        self.plugins = plugins
        self.crl = crl
        self.observe_rpcs = plugins.has_impl("jobworker_rpc_finished")
        self._observe_sent = plugins.has_impl("jobworker_output_sent")
        self.max_streams_per_client = max_streams_per_client
        self._streams: collections.Counter[str] = collections.Counter()
        #: Ended when their certificate expires or is revoked (the server's reload rechecks).
        self.open_streams = OpenStreams(crl)
        #: Told the peer of each authenticated RPC (the per-address connection gate spares it).
        self.authenticated = authenticated

    @_unary(Action.START)
    async def StartJob(self, request: pb.StartJobRequest, caller: Caller) -> pb.StartJobResponse:
        status = await self.backend.start(wire.spec_from_pb(request), owner=caller.owner)
        return pb.StartJobResponse(job_id=status.job_id)

    @_unary(Action.STOP)
    async def StopJob(self, request: pb.JobRequest, caller: Caller) -> pb.JobResponse:
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        result = await self.backend.stop(caller.target.job_id, by=caller.owner, grace=grace)
        return wire.stop_to_pb(result)

    @_unary(Action.STATUS)
    async def GetStatus(self, request: pb.JobRequest, caller: Caller) -> pb.JobStatusResponse:
        return wire.status_to_pb(caller.target)

    @_streaming(Action.STREAM)
    async def StreamOutput(  # type: ignore[override]  # yields bytes: see _pre_encoded
        self, request: pb.JobRequest, caller: Caller
    ) -> AsyncIterator[bytes]:
        """Each chunk as the bytes of a JobOutputChunk (see :class:`DecodeInHandler`); asked
        ``with_status``, a followed job's final status in one more. Asked ``direct_ok``,
        one chunk that redirects the client to the job's node instead, where the backend
        has one (docs/cluster.md, "Direct output")."""
        job_id, offset = caller.target.job_id, request.offset
        if request.direct_ok:
            redirect = await self.backend.output_redirect(
                job_id, caller.certificate, caller.identity.name, self.max_streams_per_client
            )
            if redirect is not None:
                yield codec.encode_redirect(redirect)
                return
        with self._stream_slot(caller.identity):
            chunks = self.backend.follow(job_id, offset=offset, follow=not request.no_follow)
            async for chunk in chunks:
                if self._observe_sent:
                    self.plugins.output_sent(job_id, len(chunk.data))
                message, offset = codec.encode_chunk(chunk), chunk.offset
                del chunk  # a stalled client pins one copy of a chunk, not two
                yield message
        if request.with_status and not request.no_follow:
            status = self.backend.find(job_id)  # None only if retention dropped it meanwhile
            if status is not None and self._may_see(caller.identity, status):
                end = pb.JobOutputChunk(offset=offset, status=wire.status_to_pb(status))
                yield end.SerializeToString()

    @contextlib.contextmanager
    def _stream_slot(self, identity: Identity) -> Iterator[None]:
        """Count the client's open streams; beyond its quota, RESOURCE_EXHAUSTED."""
        name, limit = identity.name, self.max_streams_per_client
        if limit is not None and self._streams[name] >= limit:
            raise ResourceExhausted(
                f"{name} has {self._streams[name]} output streams open, the most this server"
                f" allows one client (serve --max-streams-per-client {limit}); close some"
            )
        self._streams[name] += 1
        try:
            yield
        finally:
            self._streams[name] -= 1
            if not self._streams[name]:
                del self._streams[name]
            memtrim.trim_soon()

    @_unary(Action.LIST)
    async def ListJobs(self, request: pb.ListJobsRequest, caller: Caller) -> pb.ListJobsResponse:
        query = wire.list_query_from_pb(request)
        page, next_token = query.page(
            s for s in self.backend.list() if self._may_see(caller.identity, s)
        )
        return pb.ListJobsResponse(
            jobs=[wire.status_to_pb(s) for s in page], next_page_token=next_token
        )

    async def WriteInput(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> pb.WriteInputResponse:
        """Client-streaming: admitted on the first message, which names the job."""
        first = await anext(aiter(requests), None)
        if first is None:  # the client closed without a message: nothing to write to
            first = pb.InputChunk()
        async with _Admission(self, "WriteInput", Action.WRITE, first, context) as caller:
            job_id = caller.target.job_id

            async def chunks() -> AsyncIterator[InputChunk]:
                async for message in _prepend(first, requests):
                    if isinstance(message, Undecodable):
                        raise InvalidArgument(f"an InputChunk is not valid ({message.error})")
                    if message.job_id not in ("", job_id):
                        raise InvalidArgument(
                            f"one WriteInput call writes to one job ({job_id}), not"
                            f" {message.job_id[:64]!r}"
                        )
                    yield wire.input_from_pb(message)

            with self.open_streams.guard(caller.certificate, caller.identity.name):
                result = await self.backend.write_input(job_id, chunks())
            return wire.input_result_to_pb(result)

    @_unary(Action.STATUS)
    async def GetUsage(self, request: pb.UsageRequest, caller: Caller) -> pb.JobUsage:
        usage = await self._usage().usage(caller.target.job_id, request.last)
        return wire.usage_to_pb(usage)

    @_unary(Action.LIST)
    async def ListUsage(self, request: pb.ListUsageRequest, caller: Caller) -> pb.ListUsageResponse:
        running = await self._usage().running_usage(request.last)
        visible = {s.job_id for s in self.backend.list() if self._may_see(caller.identity, s)}
        jobs = [u for u in running if u.job_id in visible]
        return pb.ListUsageResponse(jobs=[wire.usage_to_pb(u) for u in jobs])

    def _usage(self) -> UsageSource:
        if not isinstance(self.backend, UsageSource):
            raise FailedPrecondition("this server's job backend does not sample usage")
        return self.backend

    def _may_see(self, identity: Identity, status: JobStatus) -> bool:
        """Listing filters by the STATUS rule, and a stream's end sends the job's status by
        it; a hidden job is skipped, not an error (the stream's client asks GetStatus)."""
        try:
            self.plugins.authorize(identity, Action.STATUS, status)
        except JobworkerError:
            return False
        return True

"""A small typed client for the jobworker API; the CLI uses it and so can you::

    from jobworker.client import JobClient
    from jobworker.tls import TlsFiles

    with JobClient("127.0.0.1:50051", TlsFiles("alice.pem", "alice.key", "ca.pem")) as jobs:
        job_id = jobs.start("sh", ["-c", "echo hi"])
        for stream, data, offset in jobs.stream(job_id):
            print(stream, data)
        print(jobs.status(job_id).exit_code)

Protobuf stays in this module: callers get attrs views and :mod:`jobworker.model` values.
Every failed call raises the :mod:`jobworker.errors` class of its gRPC status code, with the
server's message, so callers never handle ``grpc.RpcError``.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import attrs
import grpc

from jobworker import errors
from jobworker.model import IoLimit, JobState, Limits, ResourceUsage, TerminationReason
from jobworker.tls import TlsFiles, channel_credentials
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from jobworker.wire import limits_to_pb

#: Largest message accepted either way; well above the server's output chunks, small
#: enough that a misbehaving server cannot make the client allocate without bound.
MAX_MESSAGE_BYTES = 64 << 20


class Unavailable(errors.JobworkerError):
    """The server could not be reached: not running, wrong address, or TLS refused."""

    code = "UNAVAILABLE"


class RemoteError(errors.JobworkerError):
    """A status code with no class of its own (INTERNAL, UNKNOWN...); ``code`` names it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_ERRORS_BY_CODE: dict[str, type[errors.JobworkerError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.FailedPrecondition,
        errors.PermissionDenied,
        errors.Unauthenticated,
        errors.ResourceExhausted,
    )
}

_USAGE_FIELDS = tuple(field.name for field in attrs.fields(ResourceUsage))


def _json_value(inst: object, field: attrs.Attribute[Any], value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


@attrs.frozen
class JobStatusView:
    """One job as the server reported it. ``None`` means not set (still running, unknown)."""

    job_id: str
    state: JobState
    reason: TerminationReason | None  # None while running
    exit_code: int | None  # set when the process returned an exit code
    signal: int | None  # set when a signal ended it
    owner: str
    stopped_by: str | None
    escalated: bool  # a stop needed SIGKILL after the grace period
    started_at: float  # Unix time
    ended_at: float | None
    command: str
    args: tuple[str, ...]
    limits: Limits  # the limits actually applied
    usage: ResourceUsage | None
    containment: str
    output_bytes: int
    pid: int
    node: str | None = None  # the cluster node it ran on (cluster backends)

    @property
    def shell_exit_code(self) -> int | None:
        """The status a shell would report: the exit code, or 128+N after signal N."""
        if self.exit_code is not None:
            return self.exit_code
        if self.signal is not None:
            return 128 + self.signal
        return None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data in field order (the ``--json`` format of docs/cli.md)."""
        return attrs.asdict(self, value_serializer=_json_value)


@attrs.frozen
class StopView:
    """The answer to a stop request; ``status`` is the job after it (if the server sent it)."""

    success: bool
    message: str
    already_finished: bool
    escalated: bool
    status: JobStatusView | None


def _limits_from_pb(limits: pb.Limits) -> Limits:
    # On the wire 0 means "not limited"; in the model that is None.
    io: tuple[IoLimit, ...] = tuple(
        IoLimit(
            device=device.device,
            rbps=device.read_bps or None,
            wbps=device.write_bps or None,
            riops=device.read_iops or None,
            wiops=device.write_iops or None,
        )
        for device in limits.io
    )
    return Limits(
        cpu=limits.cpu or None,
        cpu_weight=limits.cpu_weight or None,
        memory=limits.memory_bytes or None,
        memory_high=limits.memory_high_bytes or None,
        pids=limits.pids or None,
        io=io,
    )


def _usage_from_pb(status: pb.JobStatusResponse) -> ResourceUsage | None:
    if not status.HasField("usage"):
        return None
    usage = status.usage
    return ResourceUsage(
        **{name: getattr(usage, name) if usage.HasField(name) else None for name in _USAGE_FIELDS}  # type: ignore[arg-type]
    )


def _status_from_pb(status: pb.JobStatusResponse) -> JobStatusView:
    try:
        state = JobState(status.status)
        reason = TerminationReason(status.reason) if status.reason else None
    except ValueError as err:
        raise RemoteError("UNKNOWN", f"the server sent {err}: upgrade jobworker") from None
    ended = state is JobState.EXITED
    return JobStatusView(
        job_id=status.job_id,
        state=state,
        reason=reason,
        # The wire always carries an int32; it means something only for a process that
        # returned one.
        exit_code=status.exit_code
        if ended and not status.signal and reason is not TerminationReason.NODE_LOST
        else None,
        signal=status.signal or None,
        owner=status.owner,
        stopped_by=status.stopped_by or None,
        escalated=status.escalated,
        started_at=status.started_at,
        ended_at=status.ended_at or None,
        command=status.command,
        args=tuple(status.args),
        limits=_limits_from_pb(status.limits),
        usage=_usage_from_pb(status),
        containment=status.containment,
        output_bytes=status.output_bytes,
        pid=status.pid,
        node=status.node or None,
    )


class JobClient:
    """A connection to one jobworker server, authenticated by a client certificate.

    ``server_name`` overrides the name checked against the server's certificate (by
    default the host part of ``target``). Use it as a context manager, or call ``close``.
    Raises :class:`jobworker.errors.ConfigError` at construction for unusable TLS files.
    """

    def __init__(self, target: str, tls: TlsFiles, *, server_name: str | None = None) -> None:
        self.target = target
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if server_name is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._channel = grpc.secure_channel(target, channel_credentials(tls), options=options)
        self._stub = pb_grpc.JobServiceStub(self._channel)

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

    def _error(self, err: grpc.RpcError) -> errors.JobworkerError:
        """The jobworker error for a failed call: same status code, the server's message."""
        code: grpc.StatusCode = err.code()
        details = err.details() or code.name
        if code is grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"cannot reach jobworker at {self.target}: {details}")
        cls = _ERRORS_BY_CODE.get(code.name)
        return cls(details) if cls is not None else RemoteError(code.name, details)

    def start(
        self,
        command: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        limits: Limits | None = None,
        node: str | None = None,
    ) -> str:
        """Start ``command`` and return the job id; ``env`` is the job's whole environment.
        ``node`` pins the job to a cluster node (cluster backends only)."""
        request = pb.StartJobRequest(
            command=command,
            args=args,
            env=env or {},
            cwd=cwd or "",
            limits=limits_to_pb(limits) if limits is not None else None,
            node=node or "",
        )
        try:
            response: pb.StartJobResponse = self._stub.StartJob(request)
        except grpc.RpcError as err:
            raise self._error(err) from None
        return response.job_id

    def status(self, job_id: str) -> JobStatusView:
        try:
            response: pb.JobStatusResponse = self._stub.GetStatus(pb.JobRequest(job_id=job_id))
        except grpc.RpcError as err:
            raise self._error(err) from None
        return _status_from_pb(response)

    def stop(self, job_id: str, grace: float | None = None) -> StopView:
        """Stop a job: SIGTERM, ``grace`` seconds (server default if None), then SIGKILL."""
        try:
            response: pb.JobResponse = self._stub.StopJob(
                pb.JobRequest(job_id=job_id, grace_seconds=grace)
            )
        except grpc.RpcError as err:
            raise self._error(err) from None
        return StopView(
            success=response.success,
            message=response.message,
            already_finished=response.already_finished,
            escalated=response.escalated,
            status=_status_from_pb(response.status) if response.HasField("status") else None,
        )

    def list(self, node: str | None = None) -> builtins.list[JobStatusView]:
        """Every job the caller may see (its own; all of them for an admin), or only those
        of cluster node ``node``."""
        try:
            response: pb.ListJobsResponse = self._stub.ListJobs(pb.ListJobsRequest(node=node or ""))
        except grpc.RpcError as err:
            raise self._error(err) from None
        return [_status_from_pb(job) for job in response.jobs]

    def stream(
        self, job_id: str, offset: int = 0, follow: bool = True
    ) -> Generator[tuple[str, bytes, int], None, None]:
        """Yield ``(stream, data, offset)`` chunks; ``stream`` is "stdout" or "stderr".

        Starts after ``offset`` (the last offset received, to resume). With ``follow`` the
        iterator ends when the job has ended and all its output was sent; without, it ends
        after the output that exists now. Closing the iterator early cancels the call.
        """
        call = self._stub.StreamOutput(
            pb.JobRequest(job_id=job_id, offset=offset, no_follow=not follow)
        )
        try:
            for chunk in call:
                yield chunk.stream, chunk.data, chunk.offset
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            call.cancel()  # no-op after a complete stream; frees the server otherwise

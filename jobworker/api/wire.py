"""Protobuf <-> domain, both directions, for every message: the one translation table.

The service (jobworker.api.service) and the client (jobworker.client) are the only modules
that speak protobuf, and both translate here. Values are validated by the model they
become (:mod:`jobworker.model`), never here; the wire's own conventions live here:

* 0 (or "") means "not set" where the model says None;
* ``exit_code`` is 128+N for a job killed by signal N (``JobStatusView.shell_exit_code``),
  and means an exit code only when ``signal`` is 0; a job lost with its cluster node has
  none, and -1 on the wire (never 0, which would read as success).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from jobworker.errors import InvalidArgument, RemoteError, UsageError
from jobworker.jobspec import IoLimit, JobSpec, Limits
from jobworker.model import (
    InputChunk,
    InputResult,
    JobState,
    JobStatus,
    JobStatusView,
    ListQuery,
    OutputChunk,
    ResourceUsage,
    StopResult,
    StopView,
    TerminationReason,
)
from jobworker.usage import JobUsage, UsageSample
from jobworker.v1 import jobworker_pb2 as pb

#: Where a server listens, and a client connects, unless told otherwise.
DEFAULT_PORT = 50051
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"


def with_default_port(address: str) -> str:
    """``HOST`` -> ``HOST:50051`` (grpc would dial 443); ``HOST:PORT`` and ``[V6]:PORT``
    unchanged, a bare IPv6 address bracketed."""
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{DEFAULT_PORT}"
    if address.count(":") > 1:  # a bare IPv6 address
        return f"[{address}]:{DEFAULT_PORT}"
    return address if ":" in address else f"{address}:{DEFAULT_PORT}"


#: gRPC target schemes a ``--server`` value may start with, passed to grpc as they are.
_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def dial_target(servers: str, server_name: str | None = None) -> tuple[str, str | None]:
    """The gRPC target for ``--server`` and the name the server's certificate must list
    (None: the host dialled).

    ``HOST[:PORT]`` is one server; ``ADDR[:PORT],ADDR[:PORT],...`` several (a cluster's
    front servers: IP addresses, one family), dialled as grpc's ``ipv4:``/``ipv6:``
    target, whose name to verify is their common host or else ``server_name``; a gRPC
    target (``dns:///NAME:PORT``, ``ipv4:...``) is used as it is. Raises UsageError."""
    if servers.startswith(_TARGET_SCHEMES):
        scheme, _, rest = servers.partition(":")
        if scheme == "dns":
            return servers, server_name
        addresses = rest.split(",")
        target = servers
    else:
        addresses = [with_default_port(a.strip()) for a in servers.split(",")]
        if len(addresses) == 1:
            return addresses[0], server_name
        target = f"{_family(servers, addresses)}:{','.join(addresses)}"
    hosts = {a.rsplit(":", 1)[0].strip("[]") for a in addresses}
    if server_name is None:
        if len(hosts) > 1:
            raise UsageError(
                f"--server {servers}: several hosts need --server-name NAME (or"
                " JOBWORKER_SERVER_NAME), the name every one's certificate lists"
            )
        server_name = hosts.pop()
    return target, server_name


def _family(servers: str, addresses: Sequence[str]) -> str:
    """grpc's scheme for a list of IP addresses: ``ipv4`` or ``ipv6``."""
    import ipaddress

    versions = set()
    for address in addresses:
        try:
            versions.add(ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]")).version)
        except ValueError:
            raise UsageError(
                f"--server {servers}: several servers must be IP addresses ({address} is"
                " not; grpc resolves one name per target): list their addresses, or give"
                " one DNS name that resolves to every one as dns:///NAME:PORT"
            ) from None
    if len(versions) > 1:
        raise UsageError(f"--server {servers}: list IPv4 or IPv6 addresses, not both")
    return f"ipv{versions.pop()}"


#: Output a server keeps per job unless told otherwise (``serve --max-output-bytes``).
DEFAULT_MAX_OUTPUT_BYTES = 4 << 30
#: Output streams one client may have open at once unless told otherwise.
DEFAULT_MAX_STREAMS_PER_CLIENT = 100

_USAGE_FIELDS = tuple(field.name for field in attrs.fields(ResourceUsage))
#: ``exit_code`` of a job lost with its cluster node, or across a server restart.
_LOST_EXIT = -1
_LOST = (TerminationReason.NODE_LOST, TerminationReason.LOST)


# -- limits ---------------------------------------------------------------------------------


def limits_to_pb(limits: Limits) -> pb.Limits:
    return pb.Limits(
        cpu=limits.cpu or 0.0,
        cpu_weight=limits.cpu_weight or 0,
        memory_bytes=limits.memory or 0,
        memory_high_bytes=limits.memory_high or 0,
        pids=limits.pids or 0,
        io=[
            pb.IoDeviceLimit(
                device=io.device,
                read_bps=io.rbps or 0,
                write_bps=io.wbps or 0,
                read_iops=io.riops or 0,
                write_iops=io.wiops or 0,
            )
            for io in limits.io
        ],
    )


def limits_from_pb(limits: pb.Limits) -> Limits:
    """Raises InvalidArgument (from the model) for values no job may have."""
    return Limits(
        cpu=limits.cpu or None,
        cpu_weight=limits.cpu_weight or None,
        memory=limits.memory_bytes or None,
        memory_high=limits.memory_high_bytes or None,
        pids=limits.pids or None,
        io=tuple(
            IoLimit(
                device=io.device,
                rbps=io.read_bps or None,
                wbps=io.write_bps or None,
                riops=io.read_iops or None,
                wiops=io.write_iops or None,
            )
            for io in limits.io
        ),
    )


# -- StartJob -------------------------------------------------------------------------------


def _check_utf8(what: str, text: str) -> None:
    """Refuse text that cannot travel: protobuf strings are UTF-8, and a command line may
    hold any bytes (Python keeps those that are not UTF-8 as lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end]
        try:
            raw = bad.encode(errors="surrogateescape")  # the bytes of the command line
        except UnicodeEncodeError:
            raw = bad.encode(errors="surrogatepass")  # a surrogate given as such
        raise UsageError(
            f"{what} holds bytes that are not UTF-8 ({raw.hex(' ')} at character"
            f" {err.start + 1}): the API carries text as protobuf strings, which are UTF-8;"
            " pass the value through a file, or encode it (base64, say) for the job to decode"
        ) from None


def start_request(
    command: str,
    args: Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    limits: Limits | None,
    user: str | None = None,
    network: str | None = None,
    stdin: bool = False,
    node: str | None = None,
) -> pb.StartJobRequest:
    """The StartJob request; raises ``UsageError`` for text that is not UTF-8."""
    _check_utf8("the command", command)
    for number, arg in enumerate(args, 1):
        _check_utf8(f"argument {number}", arg)
    for key, value in (env or {}).items():
        _check_utf8("an environment variable name", key)
        _check_utf8(f"environment variable {key.encode(errors='replace').decode()}", value)
    for what, text in (("--cwd", cwd), ("--user", user), ("--network", network), ("--node", node)):
        _check_utf8(what, text or "")
    return pb.StartJobRequest(
        command=command,
        args=args,
        env=env or {},
        cwd=cwd or "",
        limits=limits_to_pb(limits) if limits is not None else None,
        user=user or "",
        network=network or "",
        stdin=stdin,
        node=node or "",
    )


def spec_from_pb(request: pb.StartJobRequest) -> JobSpec:
    """The job a StartJob request asks for; raises InvalidArgument (from the model)."""
    return JobSpec(
        command=request.command,
        args=tuple(request.args),
        env=dict(request.env),
        cwd=request.cwd or None,
        limits=limits_from_pb(request.limits) if request.HasField("limits") else Limits(),
        user=request.user or None,
        network=request.network or None,
        stdin=request.stdin,
        node=request.node or None,
    )


# -- job status -----------------------------------------------------------------------------


def status_to_pb(status: JobStatus) -> pb.JobStatusResponse:
    return view_to_pb(JobStatusView.from_status(status))


def view_to_pb(view: JobStatusView) -> pb.JobStatusResponse:
    reply = pb.JobStatusResponse(
        job_id=view.job_id,
        status=view.state.value,
        exit_code=_LOST_EXIT if view.reason in _LOST else view.shell_exit_code or 0,
        reason="" if view.reason is None else view.reason.value,
        signal=view.signal or 0,
        owner=view.owner,
        stopped_by=view.stopped_by or "",
        escalated=view.escalated,
        started_at=view.started_at,
        ended_at=view.ended_at or 0.0,
        command=view.command,
        args=view.args,
        containment=view.containment,
        limits=limits_to_pb(view.limits),
        output_bytes=view.output_bytes,
        output_truncated=view.output_truncated,
        output_kept_bytes=view.output_kept_bytes,
        pid=view.pid,
        user=view.user or "",
        uid=-1 if view.uid is None else view.uid,
        isolation=view.isolation,
        node=view.node or "",
        enforced=view.enforced,
    )
    if view.usage is not None:
        known = {k: v for k, v in attrs.asdict(view.usage).items() if v is not None}
        reply.usage.CopyFrom(pb.ResourceUsage(**known))
    return reply


def _usage_from_pb(status: pb.JobStatusResponse) -> ResourceUsage | None:
    if not status.HasField("usage"):
        return None
    usage = status.usage
    return ResourceUsage(
        **{name: getattr(usage, name) if usage.HasField(name) else None for name in _USAGE_FIELDS}  # type: ignore[arg-type]
    )


def status_from_pb(status: pb.JobStatusResponse) -> JobStatusView:
    """The inverse of :func:`view_to_pb`."""
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
        exit_code=status.exit_code if ended and not status.signal and reason not in _LOST else None,
        signal=status.signal or None,
        owner=status.owner,
        stopped_by=status.stopped_by or None,
        escalated=status.escalated,
        started_at=status.started_at,
        ended_at=status.ended_at or None,
        command=status.command,
        args=tuple(status.args),
        limits=limits_from_pb(status.limits),
        usage=_usage_from_pb(status),
        containment=status.containment,
        output_bytes=status.output_bytes,
        # A server from before the cut existed sends neither: all it got was kept.
        output_kept_bytes=(
            status.output_kept_bytes if status.output_truncated else status.output_bytes
        ),
        output_truncated=status.output_truncated,
        pid=status.pid,
        user=status.user or None,
        uid=None if status.uid < 0 else status.uid,
        isolation=status.isolation or "none",
        node=status.node or None,
        enforced=tuple(status.enforced),
    )


# -- StopJob --------------------------------------------------------------------------------


def stop_to_pb(result: StopResult) -> pb.JobResponse:
    return pb.JobResponse(
        success=True,
        message=result.message,
        already_finished=result.already_finished,
        escalated=result.escalated,
        status=status_to_pb(result.status),
    )


def stop_from_pb(response: pb.JobResponse) -> StopView:
    return StopView(
        success=response.success,
        message=response.message,
        already_finished=response.already_finished,
        escalated=response.escalated,
        status=status_from_pb(response.status) if response.HasField("status") else None,
    )


# -- StreamOutput ---------------------------------------------------------------------------


# -- GetUsage, ListUsage ----------------------------------------------------------------------


def usage_to_pb(usage: JobUsage) -> pb.JobUsage:
    return pb.JobUsage(
        job_id=usage.job_id,
        source=usage.source,
        samples=[
            pb.UsageSample(
                time=s.time,
                cpu_usec=s.cpu_usec,
                memory_bytes=s.memory_bytes,
                pids=s.pids,
                memory_peak_bytes=s.memory_peak_bytes,
                io_read_bytes=s.io_read_bytes,
                io_write_bytes=s.io_write_bytes,
            )
            for s in usage.samples
        ],
    )


def usage_from_pb(usage: pb.JobUsage) -> JobUsage:
    def opt(sample: pb.UsageSample, name: str) -> int | None:
        return getattr(sample, name) if sample.HasField(name) else None  # type: ignore[arg-type]

    return JobUsage(
        job_id=usage.job_id,
        source=usage.source,
        samples=tuple(
            UsageSample(
                time=s.time,
                cpu_usec=s.cpu_usec,
                memory_bytes=opt(s, "memory_bytes"),
                pids=opt(s, "pids"),
                memory_peak_bytes=opt(s, "memory_peak_bytes"),
                io_read_bytes=opt(s, "io_read_bytes"),
                io_write_bytes=opt(s, "io_write_bytes"),
            )
            for s in usage.samples
        ),
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: ``stream`` (field 2, length-delimited) of a JobOutputChunk, encoded once per label.
_STREAM_FIELD = {
    label: b"\x12" + _varint(len(label)) + label.encode() for label in ("stdout", "stderr")
}


def encode_chunk(chunk: OutputChunk) -> bytes:
    """``chunk`` as the bytes of a ``JobOutputChunk``, the same bytes protobuf would make.

    By hand because every byte of output passes here: one copy of ``data`` instead of three
    (into the message, out of it, and into grpc), which the stream's throughput and the
    memory a slow follower pins both feel. The service sends these bytes as they are.
    """
    return b"".join(
        (
            b"\x0a",  # data: field 1, length-delimited
            _varint(len(chunk.data)),
            chunk.data,
            _STREAM_FIELD[chunk.stream.label],
            b"\x18",  # offset: field 3, varint
            _varint(chunk.offset),
        )
    )


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def decode_chunk(raw: bytes) -> tuple[str, memoryview, int]:
    """``(stream, data, offset)`` of a ``JobOutputChunk``'s bytes; ``data`` is a view into
    ``raw`` (no copy: the CLI writes it out as it is). Unknown fields are skipped, as
    protobuf does. Raises RemoteError for bytes that are not a chunk."""
    view = memoryview(raw)
    data, stream, offset, pos = view[0:0], "", 0, 0
    try:
        while pos < len(raw):
            key, pos = _read_varint(raw, pos)
            field, kind = key >> 3, key & 7
            if kind == 2:
                length, pos = _read_varint(raw, pos)
                if pos + length > len(raw):
                    raise ValueError("truncated field")
                if field == 1:
                    data = view[pos : pos + length]
                elif field == 2:
                    stream = raw[pos : pos + length].decode()
                pos += length
            elif kind == 0:
                value, pos = _read_varint(raw, pos)
                if field == 3:
                    offset = value
            elif kind in (1, 5):
                pos += 8 if kind == 1 else 4
            else:
                raise ValueError(f"wire type {kind}")
    except (ValueError, IndexError, UnicodeDecodeError) as err:
        raise RemoteError("UNKNOWN", f"the server sent an undecodable chunk ({err})") from None
    return stream, data, offset


# -- ListJobs -------------------------------------------------------------------------------


def list_request(query: ListQuery) -> pb.ListJobsRequest:
    return pb.ListJobsRequest(
        state="" if query.state is None else query.state.value,
        owner=query.owner or "",
        node=query.node or "",
        page_size=query.page_size,
        page_token=query.page_token,
    )


def list_query_from_pb(request: pb.ListJobsRequest) -> ListQuery:
    """Raises InvalidArgument for an unknown state or a page token we never gave."""
    try:
        state = JobState(request.state) if request.state else None
    except ValueError:
        states = ", ".join(s.value for s in JobState)
        raise InvalidArgument(
            f"state {request.state[:40]!r} is not one of {states} (or empty for any)"
        ) from None
    return ListQuery(
        state=state,
        owner=request.owner or None,
        node=request.node or None,
        page_size=request.page_size,
        page_token=request.page_token,
    )


# -- WriteInput -----------------------------------------------------------------------------


def input_from_pb(chunk: pb.InputChunk) -> InputChunk:
    return InputChunk(data=chunk.data, eof=chunk.eof)


def input_result_to_pb(result: InputResult) -> pb.WriteInputResponse:
    return pb.WriteInputResponse(bytes_written=result.written, closed=result.closed)


def input_result_from_pb(response: pb.WriteInputResponse) -> InputResult:
    return InputResult(written=response.bytes_written, closed=response.closed)

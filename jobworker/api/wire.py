"""Protobuf <-> domain, both directions, for every message: the one translation table.

The service (jobworker.api.service) and the client (jobworker.client) are the only modules
that speak protobuf, and both translate here, but for the bytes made and read by hand in
:mod:`jobworker.api.codec` (output chunks, and ``jobworker run``'s calls). Values are
validated by the model they become (:mod:`jobworker.model`), never here; the wire's own
conventions live here:

* 0 (or "") means "not set" where the model says None;
* ``exit_code`` is 128+N for a job killed by signal N (``JobStatusView.shell_exit_code``),
  and means an exit code only when ``signal`` is 0; a job lost with its cluster node has
  none, and -1 on the wire (never 0, which would read as success).
"""

from __future__ import annotations

import attrs

from jobworker.errors import InvalidArgument, RemoteError
from jobworker.jobspec import IoLimit, JobSpec, Limits
from jobworker.model import (
    InputChunk,
    InputResult,
    JobState,
    JobStatus,
    JobStatusView,
    ListQuery,
    ResourceUsage,
    StopResult,
    StopView,
    TerminationReason,
)
from jobworker.usage import JobUsage, UsageSample
from jobworker.v1 import jobworker_pb2 as pb

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

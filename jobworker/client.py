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

# First: grpc reads process-wide settings once, when it is imported (jobworker.grpcenv).
from jobworker.grpcenv import grpc  # isort: split

import builtins
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from jobworker import errors, wire
from jobworker.model import JobStatusView, Limits, StopView
from jobworker.tls import TlsFiles, channel_credentials
from jobworker.usage import JobUsage
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

__all__ = ["MAX_MESSAGE_BYTES", "JobClient", "JobStatusView", "StopView"]

#: Largest message accepted either way; well above the server's output chunks, small
#: enough that a misbehaving server cannot make the client allocate without bound.
MAX_MESSAGE_BYTES = 64 << 20


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
            return errors.Unavailable(f"cannot reach jobworker at {self.target}: {details}")
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
        node: str | None = None,
    ) -> str:
        """Start ``command`` and return the job id; ``env`` is the job's whole environment.

        ``user``: the Unix account to run as (None: the client's default); ``network``:
        "host" or "none" (None: the server's default); ``node``: the cluster node to run
        on (cluster backends only)."""
        request = wire.start_request(command, args, env, cwd, limits, user, network, node)
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
        return wire.status_from_pb(response)

    def stop(self, job_id: str, grace: float | None = None) -> StopView:
        """Stop a job: SIGTERM, ``grace`` seconds (server default if None), then SIGKILL."""
        try:
            response: pb.JobResponse = self._stub.StopJob(
                pb.JobRequest(job_id=job_id, grace_seconds=grace)
            )
        except grpc.RpcError as err:
            raise self._error(err) from None
        return wire.stop_from_pb(response)

    def list(self, node: str | None = None) -> builtins.list[JobStatusView]:
        """Every job the caller may see (its own; all of them for an admin), or only those
        of cluster node ``node``."""
        try:
            response: pb.ListJobsResponse = self._stub.ListJobs(pb.ListJobsRequest(node=node or ""))
        except grpc.RpcError as err:
            raise self._error(err) from None
        return [wire.status_from_pb(job) for job in response.jobs]

    def usage(self, job_id: str, last: int = 0) -> JobUsage:
        """The job's usage samples, oldest first (the newest ``last`` only; 0: all)."""
        try:
            response: pb.JobUsage = self._stub.GetUsage(pb.UsageRequest(job_id=job_id, last=last))
        except grpc.RpcError as err:
            raise self._error(err) from None
        return wire.usage_from_pb(response)

    def running_usage(self, last: int = 0) -> builtins.list[JobUsage]:
        """Usage samples of every running job the caller may see."""
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

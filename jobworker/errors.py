"""The one error hierarchy of jobworker.

Every error a caller can act on is a ``JobworkerError``; its ``code`` names the gRPC status
it travels as. :data:`ERRORS_BY_CODE` is the one table between codes and classes: the
service answers with :func:`wire_code`, the client raises :func:`error_from_code`, and the
CLI turns either into a one-line message and a non-zero exit status. Anything else
reaching the edge is a bug and is reported as INTERNAL without a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping


class JobworkerError(Exception):
    """Base class: ``str(err)`` is the message a person reads."""

    code: str = "UNKNOWN"


class InvalidArgument(JobworkerError):
    """The request itself is wrong: fix the input and retry."""

    code = "INVALID_ARGUMENT"


class NotFound(JobworkerError):
    """No such job (or one the caller may not see)."""

    code = "NOT_FOUND"


class FailedPrecondition(JobworkerError):
    """The request is well formed but the system is not in a state to do it."""

    code = "FAILED_PRECONDITION"


class SpawnError(FailedPrecondition):
    """The command could not be executed (not found, not executable, bad cwd)."""


#: How a SpawnError's message starts when ``execve`` failed; ``jobworker run`` exits 127
#: (not found) or 126 (found, not executable) on it, as a shell does.
EXEC_FAILED = "cannot execute"


class ConfigError(FailedPrecondition):
    """The server or a plugin is misconfigured; raised at start-up."""


class PermissionDenied(JobworkerError):
    """The caller is known but not allowed to do this."""

    code = "PERMISSION_DENIED"


class Unauthenticated(JobworkerError):
    """The caller's identity could not be established or is revoked."""

    code = "UNAUTHENTICATED"


class ResourceExhausted(JobworkerError):
    """A server-side bound was reached (too many jobs, for instance)."""

    code = "RESOURCE_EXHAUSTED"


class DataLoss(JobworkerError):
    """Output was not kept (a cap, the spool budget, a full disk): a stream that reaches
    the cut ends with this instead of a clean end."""

    code = "DATA_LOSS"


def server_full(running: int, limit: int) -> ResourceExhausted:
    """The one message for ``--max-jobs``, on every backend."""
    return ResourceExhausted(
        f"{running} jobs are running, the most this server allows ({limit}); stop some or"
        " wait for them to finish"
    )


def client_full(owner: str, active: int, limit: int) -> ResourceExhausted:
    """The one message for ``--max-jobs-per-client``, on every backend."""
    return ResourceExhausted(
        f"{owner} has {active} jobs starting or running, the most one client may have"
        f" (--max-jobs-per-client {limit}); stop some or wait for them to finish"
    )


def job_not_found(job_id: str) -> NotFound:
    """The one NOT_FOUND message, so a hidden job is indistinguishable from a missing one."""
    return NotFound(f"job {job_id!r} not found")


class UsageError(InvalidArgument):
    """The command line is wrong; the CLI prints it on one line and exits 2."""


class Unavailable(JobworkerError):
    """The server could not be reached: not running, wrong address, or TLS refused."""

    code = "UNAVAILABLE"


class RemoteError(JobworkerError):
    """A status code with no class of its own (INTERNAL, UNKNOWN...); ``code`` names it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


#: The gRPC status (by name) of each error class a server answers with, and the class a
#: client raises for it.
ERRORS_BY_CODE: Mapping[str, type[JobworkerError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        DataLoss,
        Unavailable,
    )
}


def wire_code(err: BaseException) -> str | None:
    """The status ``err`` is answered with; None for a bug (answered as INTERNAL)."""
    if not isinstance(err, JobworkerError):
        return None
    if err.code in ERRORS_BY_CODE or err.code == JobworkerError.code:
        return err.code
    return None


def error_from_code(code: str, message: str) -> JobworkerError:
    """What a client raises for a failed call with status ``code`` and the server's message."""
    cls = ERRORS_BY_CODE.get(code)
    return RemoteError(code, message) if cls is None else cls(message)

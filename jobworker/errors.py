"""The one error hierarchy of jobworker.

Every error a caller can act on is a ``JobworkerError``; its ``code`` names the gRPC status
it maps to (the table lives in :mod:`jobworker.service`), and the CLI turns it into a
one-line message and a non-zero exit status. Anything else reaching the edge is a bug and
is reported as INTERNAL without a traceback.
"""

from __future__ import annotations


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


def job_not_found(job_id: str) -> NotFound:
    """The one NOT_FOUND message, so a hidden job is indistinguishable from a missing one."""
    return NotFound(f"job {job_id!r} not found")

"""The ``audit-log`` built-in plugin: one JSON object per line for every security event.

``jobworker serve --plugin audit-log --audit-log /var/log/jobworker/audit.jsonl`` records
each authorization decision, each job start and each job end (docs/audit-log.md has the
fields). Without ``--audit-log`` records go to stderr, where the ``audit`` key tells them
from the server's own log lines.

The file survives rotation the way ``logrotate`` expects: it is reopened after SIGHUP and
whenever the path no longer names the open file (moved or removed). Events are per RPC or
per job, never per output chunk, so one ``os.stat`` per record is cheap. A write that
fails (disk full, file system gone) never stops a job: the record is lost, the server log
says so once per failure streak, and the next record tries again.

:class:`AuditLog` is the plugin, one destination per instance: ``--plugin audit-log``
makes one on stderr and its ``jobworker_configure`` opens ``--audit-log``; tests and
embedders register ``AuditLog(path)``. Each plugin host has its own instance.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import types
from datetime import UTC, datetime
from typing import Any

import attrs
import structlog

from jobworker.api.identity import Identity
from jobworker.errors import ConfigError, JobworkerError
from jobworker.hooks import hookimpl
from jobworker.jobspec import JobSpec, Limits
from jobworker.model import Action, JobStatus

log = structlog.get_logger("jobworker.auditlog")

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def _timestamp(when: float | None = None) -> str:
    """UTC ISO-8601 with microseconds and a ``Z``: sorts as text, parses everywhere."""
    moment = datetime.now(UTC) if when is None else datetime.fromtimestamp(when, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _limits(limits: Limits) -> dict[str, Any]:
    return attrs.asdict(limits)


class AuditLog:
    """Appends audit records to ``path`` (None: stderr), one line and one write each.

    Hook methods run on the event loop's thread; a lock still guards the file so that a
    record written from another thread (an embedder's) cannot interleave with one from it.
    """

    #: One line for `jobworker plugins`.
    description = "records every decision, start, refusal and exit as JSON lines (--audit-log FILE)"

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path: str | None = None
        self._lock = threading.Lock()
        # The process's stderr, whatever sys.stderr was replaced with, until ``use``.
        self._fd: int | None = 2
        self._reopen_requested = False
        self._lost = 0  # records lost in the current failure streak
        if path is not None:
            self.use(path)

    # -- the file ------------------------------------------------------------------------

    def use(self, path: str | os.PathLike[str]) -> None:
        """Append to ``path`` from now on; raises ``ConfigError`` if it cannot be opened."""
        try:
            fd = os.open(path, _OPEN_FLAGS, 0o600)
        except OSError as err:  # at start-up a bad path is the operator's to fix
            raise ConfigError(f"cannot open audit log {path}: {err.strerror}") from None
        with self._lock:
            self._close()
            self.path, self._fd = os.fspath(path), fd

    def _open(self) -> None:
        assert self.path is not None
        fd = os.open(self.path, _OPEN_FLAGS, 0o600)
        self._close()
        self._fd = fd

    def _close(self) -> None:
        if self._fd is not None and self.path is not None:
            os.close(self._fd)
        self._fd = None

    def request_reopen(self) -> None:
        """Reopen before the next record; safe to call from a signal handler."""
        self._reopen_requested = True

    def _needs_reopen(self) -> bool:
        if self._fd is None or self._reopen_requested:
            return True
        assert self.path is not None
        try:
            named = os.stat(self.path)
        except FileNotFoundError:  # moved away or removed: logrotate's "create" mode
            return True
        opened = os.fstat(self._fd)
        return (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` with its ``time``; never raises for the file's sake."""
        data = (json.dumps({"time": _timestamp(), **record}, default=str) + "\n").encode()
        with self._lock:
            try:
                if self.path is not None and self._needs_reopen():
                    self._open()
                    self._reopen_requested = False
                assert self._fd is not None
                view = memoryview(data)
                while view:  # a regular file takes it all; a pipe may not
                    view = view[os.write(self._fd, view) :]
            except OSError as err:
                if self._lost == 0:
                    log.error(
                        "audit_log_write_failed",
                        path=self.where,
                        error=err.strerror or str(err),
                        audit=record.get("audit"),
                        consequence="audit records are lost until a write succeeds;"
                        " jobs keep running",
                    )
                self._lost += 1
                return
            if self._lost:
                log.warning("audit_log_recovered", path=self.where, lost_records=self._lost)
                self._lost = 0

    @property
    def where(self) -> str:
        """The destination, for messages."""
        return self.path or "<stderr>"

    def close(self) -> None:
        with self._lock:
            self._close()

    # -- hooks ---------------------------------------------------------------------------

    @hookimpl
    def jobworker_add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("audit-log")
        group.add_argument(
            "--audit-log",
            metavar="PATH",
            help="append audit records (JSON lines, mode 0600 when created) to PATH; reopened "
            "on SIGHUP or when moved (default: stderr)",
        )

    @hookimpl
    def jobworker_configure(self, options: argparse.Namespace) -> None:
        path = getattr(options, "audit_log", None)
        if path is not None:
            self.use(path)
            _reopen_on_sighup(self)
        log.info("audit_log_opened", path=self.where)

    @hookimpl(specname="jobworker_decision")
    def decision(
        self, identity: Identity, action: Action, job_id: str | None, allowed: bool, reason: str
    ) -> None:
        self.write(
            {
                "audit": "decision",
                "identity": identity.name,
                "identity_names": list(identity.names),
                "action": action.value,
                "job_id": job_id,
                "allowed": allowed,
                "reason": reason,
            }
        )

    @hookimpl(specname="jobworker_job_started")
    def job_started(self, status: JobStatus) -> None:
        spec = status.spec
        self.write(
            {
                "audit": "job_started",
                "job_id": status.job_id,
                "owner": status.owner,
                "command": spec.command,
                "args": list(spec.args),
                "cwd": spec.cwd,
                # Names only: values are where people put tokens and passwords.
                "env_names": sorted(spec.env),
                "limits": _limits(spec.limits),
                "applied_limits": _limits(status.applied_limits),
                "containment": status.containment,
                "pid": status.pid,
                "node": status.node,
                "started_at": _timestamp(status.started_at),
            }
        )

    @hookimpl(specname="jobworker_start_refused")
    def start_refused(self, job_id: str, spec: JobSpec, owner: str, error: JobworkerError) -> None:
        self.write(
            {
                "audit": "job_refused",
                "job_id": job_id,
                "owner": owner,
                "command": spec.command,
                "args": list(spec.args),
                "cwd": spec.cwd,
                "env_names": sorted(spec.env),
                "limits": _limits(spec.limits),
                "code": error.code,
                "error": str(error),
            }
        )

    @hookimpl(specname="jobworker_on_exit")
    def on_exit(self, status: JobStatus) -> None:
        ex = status.exit
        ended = status.ended_at
        self.write(
            {
                "audit": "job_exited",
                "job_id": status.job_id,
                "owner": status.owner,
                "node": status.node,
                "reason": None if ex is None else ex.reason.value,
                "exit_code": None if ex is None else ex.exit_code,
                "signal": None if ex is None else ex.signal,
                "stopped_by": None if ex is None else ex.stopped_by,
                "escalated": False if ex is None else ex.escalated,
                "started_at": _timestamp(status.started_at),
                "ended_at": None if ended is None else _timestamp(ended),
                "duration": None if ended is None else round(ended - status.started_at, 6),
                "usage": None if status.usage is None else attrs.asdict(status.usage),
            }
        )

    @hookimpl(specname="jobworker_shutdown")
    def shutdown(self) -> None:
        self.close()


def _reopen_on_sighup(audit: AuditLog) -> None:
    """Make SIGHUP reopen ``audit``'s file, keeping any handler that was there before.

    The handler only sets a flag: the signal may arrive in the middle of a write, so the
    reopen itself waits for the next record. Only the main thread may set handlers; off it
    (an embedder's thread) the moved-file check alone covers rotation.
    """
    if threading.current_thread() is not threading.main_thread():
        log.info("audit_log_no_sighup", reason="not on the main thread; rotation is detected")
        return
    previous = signal.getsignal(signal.SIGHUP)

    def on_sighup(signum: int, frame: types.FrameType | None) -> None:
        audit.request_reopen()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, on_sighup)

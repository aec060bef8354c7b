"""The per-job record a server with ``--live-restore`` keeps beside a job's spool.

Jobs live in memory; the record is only what the *next* server needs to adopt a job it
did not start, and what it cannot learn from the running system itself: who owns the job,
what it asked for, where its output and exit report are, and which process it is. It is
one small JSON file per job, ``<job id>.job`` in the server's spool run directory (not a
database), replaced atomically (``rename``) when it changes: before the job is reported
started, when its stdin closes, and once more when it ends.

**Versions.** Every record carries ``version``. A server reads every version up to its own
(:data:`RECORD_VERSION`), filling what an older one lacks with what that version meant; a
record it cannot read (unknown version, damaged) raises :class:`RecordError` with a
sentence for the log, and the job it describes is never adopted.

**Which process.** A pid alone names a different process once it is reused. The record
keeps the pid with the process's start time (``/proc/PID/stat`` field 22, clock ticks
since boot) and the boot id; a process is the job's only if all three match, read
*after* its pidfd was opened (a pidfd cannot follow a reused pid). See
:func:`identify`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from jobworker.errors import JobworkerError
from jobworker.jobspec import IoLimit, JobSpec, Limits
from jobworker.model import ExitInfo, ResourceUsage, TerminationReason

#: The version this server writes; it reads every version from 1 up to this one.
RECORD_VERSION = 1
RECORD_SUFFIX = ".job"
EXIT_SUFFIX = ".exit"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class RecordError(Exception):
    """A record this server cannot use; ``str(err)`` says why, for the log."""


@attrs.frozen
class ProcessIdentity:
    """A process, told apart from any later one that reuses its pid."""

    pid: int
    start_ticks: int
    boot_id: str

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        """The identity of process ``pid`` (a child not yet reaped); ProcessLookupError if
        there is none."""
        stat = _read_stat(pid)
        if stat is None:
            raise ProcessLookupError(f"process {pid} is gone")
        return cls(pid, int(stat[19]), boot_id())


def boot_id() -> str:
    return _BOOT_ID.read_text().strip()


def _read_stat(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (field 3 onwards), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def identify(identity: ProcessIdentity) -> str | None:
    """Why the process ``identity.pid`` is not ``identity`` (None: it is).

    Call it while holding a pidfd opened on ``identity.pid``: if the stat still shows the
    recorded start time, that pidfd holds the recorded process. A job's first process
    leads its own session (the launcher's ``setsid``).
    """
    if identity.boot_id != boot_id():
        return "the host has rebooted since the job started"
    stat = _read_stat(identity.pid)
    if stat is None:
        return f"process {identity.pid} is gone"
    if int(stat[19]) != identity.start_ticks:
        return f"pid {identity.pid} now belongs to another process (a later start time)"
    if int(stat[3]) != identity.pid:
        return f"process {identity.pid} does not lead its session, as a job's first process does"
    return None


def _plain(inst: object, field: attrs.Attribute[Any], value: Any) -> Any:
    if isinstance(value, TerminationReason):
        return value.value
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _spec_from(data: dict[str, Any]) -> JobSpec:
    return JobSpec(**{**data, "limits": _limits_from(data["limits"])})


def _limits_from(data: dict[str, Any]) -> Limits:
    return Limits(**{**data, "io": tuple(IoLimit(**io) for io in data["io"])})


@attrs.frozen
class JobEnd:
    """How a job ended, and what its output came to, as the server that saw it end knew."""

    exit: ExitInfo
    ended_at: float
    usage: ResourceUsage | None
    #: Bytes the job wrote, kept or not, and why the log was cut (None: it was not).
    output_seen: int
    output_cut: str | None


@attrs.frozen(kw_only=True)
class JobRecord:
    """One job's record; see the module docstring."""

    job_id: str
    owner: str
    spec: JobSpec
    started_at: float
    process: ProcessIdentity
    #: The containment's name as status shows it (``cgroupv2:<path>``, ``process-group``).
    containment: str
    applied_limits: Limits
    user: str | None
    uid: int
    isolation: str
    #: File names in the record's directory: the output spool and the exit report.
    spool: str
    exit_report: str
    max_output_bytes: int | None
    end: JobEnd | None = None

    @property
    def file_name(self) -> str:
        return self.job_id + RECORD_SUFFIX

    def to_json(self) -> bytes:
        data = attrs.asdict(self, value_serializer=_plain)
        return json.dumps({"version": RECORD_VERSION, **data}, sort_keys=True).encode()

    def write(self, directory: Path) -> None:
        """Replace the record in ``directory`` atomically (a reader sees old or new)."""
        path = directory / self.file_name
        partial = directory / f".{self.file_name}.new"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, self.to_json())
        finally:
            os.close(fd)
        os.replace(partial, path)

    @classmethod
    def read(cls, path: Path) -> JobRecord:
        """The record at ``path``; RecordError when it cannot be used."""
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as err:
            raise RecordError(f"record {path} is unreadable: {err}") from None
        version = data.pop("version", None) if isinstance(data, dict) else None
        if not isinstance(version, int) or not 1 <= version <= RECORD_VERSION:
            raise RecordError(
                f"record {path} has version {version!r}; this server reads versions 1 to"
                f" {RECORD_VERSION}: adopt it with the jobworker that wrote it, or a newer one"
            )
        try:
            return cls._from_v1(data)
        except (KeyError, TypeError, ValueError, JobworkerError) as err:
            # JobworkerError: a spec or limits this version's rules refuse.
            raise RecordError(f"record {path} is damaged: {err!r}") from None

    @classmethod
    def _from_v1(cls, data: dict[str, Any]) -> JobRecord:
        data.pop("stdin_closed", None)  # in the first v1 records, never read
        end = data.pop("end")
        if end is not None:
            exit_info = {**end["exit"], "reason": TerminationReason(end["exit"]["reason"])}
            usage = end["usage"]
            end = JobEnd(
                **{
                    **end,
                    "exit": ExitInfo(**exit_info),
                    "usage": None if usage is None else ResourceUsage(**usage),
                }
            )
        return cls(
            **{
                **data,
                "spec": _spec_from(data["spec"]),
                "process": ProcessIdentity(**data["process"]),
                "applied_limits": _limits_from(data["applied_limits"]),
                "end": end,
            }
        )


def remove_files(directory: Path, job_id: str) -> None:
    """The record and exit report of ``job_id`` (its spool is the output log's to remove)."""
    for suffix in (RECORD_SUFFIX, EXIT_SUFFIX):
        (directory / (job_id + suffix)).unlink(missing_ok=True)

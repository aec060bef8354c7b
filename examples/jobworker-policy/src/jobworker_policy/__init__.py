"""jobworker-policy: which commands each client may run, and for how long.

``jobworker serve --plugin policy --policy-file policy.toml`` loads :class:`Policy`:

* ``jobworker_pre_spawn`` (a gate) refuses a command outside the owner's allow-list, and
  rewrites an allowed bare name to the absolute path it stands for, so that a client
  cannot run its own ``echo`` by sending ``PATH=/tmp/mine`` in the job's environment;
* ``jobworker_job_started`` and ``jobworker_on_exit`` (observers) arm and disarm a timer
  per job; at the owner's ``max_runtime`` the job is stopped through the job manager the
  server hands over in ``jobworker_manager_ready``, so status and audit show
  ``stopped_by = "policy:max-runtime"`` like any other stop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from jobworker import hookimpl
from jobworker.errors import ConfigError, FailedPrecondition, PermissionDenied
from jobworker.jobspec import DEFAULT_PATH, JobSpec
from jobworker.model import JobStatus

if TYPE_CHECKING:
    from jobworker.backends.base import JobBackend

__version__ = "0.1.0"

log = structlog.get_logger("jobworker_policy")

#: ``stopped_by`` of a job that reached its deadline.
STOPPED_BY = "policy:max-runtime"
ANY_COMMAND = "*"


def _resolve(command: str) -> str | None:
    """The executable ``command`` names on this server, or None if there is none.

    A bare name is looked up in the server's default PATH, never in one the client sent;
    a relative path with a slash depends on the job's cwd and is never allowed.
    """
    if "/" not in command:
        return shutil.which(command, path=DEFAULT_PATH)
    if not os.path.isabs(command) or not os.access(command, os.X_OK):
        return None
    return command


@attrs.frozen
class Rule:
    """What one identity may do. ``commands`` None means any command."""

    commands: frozenset[str] | None = frozenset()
    max_runtime: float | None = None

    def check(self, command: str) -> str:
        """The absolute path to run for ``command``; raises PermissionDenied if not allowed."""
        path = _resolve(command)
        if self.commands is None:
            return command if path is None else path
        # Compare real paths: /bin/echo and /usr/bin/echo are one program on merged /usr.
        allowed = {os.path.realpath(p) for p in map(_resolve, self.commands) if p is not None}
        if path is None or os.path.realpath(path) not in allowed:
            names = ", ".join(sorted(self.commands)) or "nothing"
            raise PermissionDenied(f"policy: {command!r} is not allowed (allowed: {names})")
        return path


def _rule(where: str, table: Any, base: Rule) -> Rule:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} is not a table")
    unknown = sorted(set(table) - {"commands", "max_runtime"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected commands, max_runtime")
    commands = base.commands
    if "commands" in table:
        listed = table["commands"]
        if not isinstance(listed, list) or not all(isinstance(c, str) and c for c in listed):
            raise ConfigError(f"{where}: commands must be a list of command names or paths")
        commands = None if ANY_COMMAND in listed else frozenset(listed)
    max_runtime = base.max_runtime
    if "max_runtime" in table:
        seconds = table["max_runtime"]
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            raise ConfigError(f"{where}: max_runtime must be a positive number of seconds")
        max_runtime = float(seconds)
    return Rule(commands=commands, max_runtime=max_runtime)


@attrs.frozen
class Rules:
    """The rule of each identity; ``default`` for the ones not listed."""

    default: Rule = Rule()
    identities: Mapping[str, Rule] = attrs.field(factory=dict)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Rules:
        """Load a policy file; raises ConfigError naming the file and the bad entry."""
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as err:
            raise ConfigError(f"cannot read policy file {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"policy file {path} is not valid TOML: {err}") from None
        return cls.from_dict(doc, where=str(path))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "policy") -> Rules:
        unknown = sorted(set(doc) - {"default", "identities"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected default, identities")
        default = _rule(f"{where}: [default]", doc.get("default", {}), Rule())
        identities = doc.get("identities", {})
        if not isinstance(identities, dict):
            raise ConfigError(f"{where}: identities must be a table of [identities.NAME]")
        return cls(
            default=default,
            identities={
                name: _rule(f"{where}: [identities.{name}]", table, default)
                for name, table in identities.items()
            },
        )

    def for_owner(self, owner: str) -> Rule:
        return self.identities.get(owner, self.default)


class Policy:
    """The plugin; ``--plugin policy`` makes one with no arguments, tests pass ``rules``."""

    def __init__(self, rules: Rules | None = None, stop_grace: float = 5.0) -> None:
        self.rules = rules
        self.stop_grace = stop_grace
        self._manager: JobBackend | None = None
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        self._stops: set[asyncio.Task[Any]] = set()

    # -- set-up --------------------------------------------------------------------------

    @hookimpl
    def jobworker_add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("policy", "jobworker-policy " + __version__)
        group.add_argument(
            "--policy-file",
            metavar="FILE",
            help="TOML: [default] and [identities.NAME] tables of commands and max_runtime",
        )
        group.add_argument(
            "--policy-stop-grace",
            type=float,
            default=5.0,
            metavar="SECONDS",
            help="SIGTERM to SIGKILL at a deadline (default %(default)s)",
        )

    @hookimpl
    def jobworker_configure(self, options: argparse.Namespace) -> None:
        if not options.policy_file:
            raise ConfigError("--plugin policy needs --policy-file FILE")
        self.rules = Rules.from_file(options.policy_file)
        self.stop_grace = options.policy_stop_grace
        log.info(
            "policy_loaded",
            path=options.policy_file,
            identities=sorted(self.rules.identities),
        )

    @hookimpl
    def jobworker_manager_ready(self, manager: JobBackend) -> None:
        self._manager = manager

    @hookimpl
    def jobworker_shutdown(self) -> None:
        for handle in self._deadlines.values():
            handle.cancel()
        self._deadlines.clear()

    # -- the gate ------------------------------------------------------------------------

    @hookimpl
    def jobworker_pre_spawn(self, spec: JobSpec, owner: str) -> JobSpec:
        if self.rules is None:  # registered but never configured: refuse, never guess
            raise FailedPrecondition("policy: no policy loaded")
        rule = self.rules.for_owner(owner)
        path = rule.check(spec.command)
        if rule.max_runtime is not None and self._manager is None:
            raise FailedPrecondition(
                "policy: cannot enforce max_runtime: this server never called "
                "jobworker_manager_ready (upgrade jobworker)"
            )
        return attrs.evolve(spec, command=path)

    # -- the deadline --------------------------------------------------------------------

    @hookimpl
    def jobworker_job_started(self, status: JobStatus) -> None:
        assert self.rules is not None  # pre_spawn let the job through
        limit = self.rules.for_owner(status.owner).max_runtime
        if limit is None:
            return
        delay = max(0.0, status.started_at + limit - time.time())
        self._deadlines[status.job_id] = asyncio.get_running_loop().call_later(
            delay, self._expire, status.job_id, limit
        )

    @hookimpl
    def jobworker_on_exit(self, status: JobStatus) -> None:
        handle = self._deadlines.pop(status.job_id, None)
        if handle is not None:
            handle.cancel()

    def _expire(self, job_id: str, limit: float) -> None:
        self._deadlines.pop(job_id, None)
        assert self._manager is not None
        log.info("policy_deadline", job_id=job_id, max_runtime=limit)
        task = asyncio.ensure_future(
            self._manager.stop(job_id, by=STOPPED_BY, grace=self.stop_grace)
        )
        self._stops.add(task)
        task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[Any]) -> None:
        self._stops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("policy_stop_failed", error=str(task.exception()))

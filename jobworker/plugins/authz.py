"""The ``authz`` built-in plugin: who may do what, from a TOML whitelist.

Always loaded by the server, and fail closed: without a whitelist the server refuses to
start. The file (``--authz FILE``, or ``$JOBWORKER_AUTHZ``)::

    [[clients]]
    identity = "alice"   # matched against the certificate's names (docs/security.md)
    role = "user"        # "user": only its own jobs; "admin": every job
    run_as = ["alice", "nobody"]  # optional: Unix accounts its jobs may use, default first
    networks = ["host"]  # optional: its jobs may use the host's network

A client without ``run_as`` runs its jobs as the server's ``--job-user``; ``root`` is
never implied, only listed. Every client may ask for a ``private`` network (the default)
or ``none``; ``host`` only where ``networks`` lists it.

The caller's names are matched in order (CN, then DNS, e-mail and URI SANs as the
certificate lists them, see :mod:`jobworker.api.identity`); the first listed one is the
caller's principal: it gives the role, the ``run_as`` list, and the owner of the jobs the
caller starts, so a certificate can never take its role from one entry and its jobs from
another. A caller none of whose names is listed is denied everything
(PERMISSION_DENIED). A user may start jobs, list (and sees only its own jobs), and act on
its own jobs; another owner's job answers NOT_FOUND with the very message of an unknown
id, so a user cannot probe which ids exist. An admin may do everything.

:class:`Authz` is the plugin: ``--plugin authz`` makes one with nothing loaded and its
``jobworker_configure`` loads ``--authz``; tests and embedders register
``Authz.from_file(path)`` under the name "authz". Each plugin host has its own instance.
On SIGHUP (``jobworker_reload``) the file is read again; one that fails to load leaves
the old whitelist in force.
"""

from __future__ import annotations

import argparse
import enum
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog

from jobworker.api.identity import Identity
from jobworker.errors import ConfigError, PermissionDenied, job_not_found
from jobworker.hooks import hookimpl
from jobworker.jobspec import Network
from jobworker.model import Action, JobStatus

log = structlog.get_logger("jobworker.authz")

ENV_VAR = "JOBWORKER_AUTHZ"


class Role(enum.Enum):
    USER = "user"
    ADMIN = "admin"


#: The role names a whitelist (and ``jobworker certs init --client NAME:ROLE``) accepts.
ROLES: tuple[str, ...] = tuple(role.value for role in Role)


_ENTRY_KEYS = {"identity", "role", "run_as", "networks"}
#: What ``networks`` may grant: the others need no grant.
_GRANTABLE = (Network.HOST.value,)


@attrs.frozen
class _Client:
    role: Role
    run_as: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()


def _parse_networks(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(v in _GRANTABLE for v in value):
        raise ConfigError(
            f"{where}: networks must be a list of {', '.join(map(repr, _GRANTABLE))}, e.g."
            ' ["host"] (private and none need no grant)'
        )
    return tuple(value)


def _parse_run_as(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v and v.isprintable() for v in value)
    ):
        raise ConfigError(
            f'{where}: run_as must be a non-empty list of account names, e.g. ["alice"]'
        )
    return tuple(value)


def _parse_entry(path: Path, index: int, entry: Any) -> tuple[str, _Client]:
    where = f"{path}: clients entry {index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} is not a table: write [[clients]] then identity and role")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; expected identity, role, run_as and networks"
        )
    identity = entry.get("identity")
    if not isinstance(identity, str) or not identity.strip():
        raise ConfigError(f"{where}: identity must be a non-empty string (a CN or SAN)")
    role = entry.get("role")
    roles = ", ".join(map(repr, ROLES))
    if role not in ROLES:
        raise ConfigError(f"{where} ({identity!r}): role {role!r} is not one of {roles}")
    run_as = _parse_run_as(f"{where} ({identity!r})", entry.get("run_as"))
    networks = _parse_networks(f"{where} ({identity!r})", entry.get("networks"))
    return identity, _Client(Role(role), run_as, networks)


@attrs.define(eq=False)
class Authz:
    """The plugin: the role (and accounts) of each identity of one loaded whitelist (none
    until loaded)."""

    #: One line for `jobworker plugins`.
    description = "the client whitelist (--authz FILE): who may call, their role and accounts"

    path: Path | None = None
    clients: Mapping[str, _Client] = attrs.field(factory=dict)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Authz:
        """Load and validate a whitelist; raises ``ConfigError`` naming the file and entry."""
        authz = cls()
        authz.load(path)
        return authz

    def load(self, path: str | os.PathLike[str]) -> None:
        """Read the whitelist at ``path``; on an error the previous one stays in force."""
        self.clients = _read_whitelist(Path(path))
        self.path = Path(path)

    def _match(self, identity: Identity) -> tuple[str, _Client] | None:
        """The first of the identity's names that is listed, and its entry."""
        for name in identity.names:
            if name in self.clients:
                return name, self.clients[name]
        return None

    def role_of(self, identity: Identity) -> Role | None:
        """The role of the first of the identity's names (CN, then SANs) that is listed."""
        match = self._match(identity)
        return None if match is None else match[1].role

    @hookimpl(specname="jobworker_principal")
    def principal(self, identity: Identity) -> str | None:
        """The listed name the identity acts as (and owns jobs by)."""
        match = self._match(identity)
        return None if match is None else match[0]

    @hookimpl(specname="jobworker_reload")
    def reload(self) -> Callable[[], None] | None:
        """Read the whitelist again; the returned callable puts it in force."""
        path = self.path
        if path is None:
            return None
        clients = _read_whitelist(path)

        def commit() -> None:
            self.clients = clients
            log.info("authz_reloaded", path=str(path), clients=len(clients))

        return commit

    @hookimpl(specname="jobworker_accounts")
    def accounts(self, owner: str) -> tuple[str, ...] | None:
        """The ``run_as`` list of the job's owner, if the whitelist gives one."""
        client = self.clients.get(owner)
        return client.run_as if client is not None and client.run_as else None

    @hookimpl(specname="jobworker_networks")
    def networks(self, owner: str) -> tuple[str, ...] | None:
        """The networks the whitelist grants the job's owner (``networks``), if any."""
        client = self.clients.get(owner)
        return client.networks if client is not None and client.networks else None

    @hookimpl
    def jobworker_add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("authz")
        group.add_argument(
            "--authz",
            metavar="FILE",
            default=os.environ.get(ENV_VAR),
            help=f"TOML whitelist of client identities and roles (env {ENV_VAR}; default:"
            " the dev PKI's authz.toml when no --tls-* option is given, else required)",
        )

    @hookimpl
    def jobworker_configure(self, options: argparse.Namespace) -> None:
        path = getattr(options, "authz", None)
        if path:
            self.load(path)
            log.info("authz_loaded", path=str(self.path), clients=len(self.clients))
        elif self.path is None:
            raise ConfigError(
                "no authorization whitelist: pass --authz FILE (or set "
                f"{ENV_VAR}); the server refuses to start without one"
            )

    @hookimpl(specname="jobworker_authorize")
    def authorize(self, identity: Identity, action: Action, job: JobStatus | None) -> bool:
        """Allow (True) or raise: PermissionDenied for strangers, NotFound to hide a job."""
        if self.path is None:  # registered but never configured: deny, never guess
            raise PermissionDenied("the authorization whitelist is not loaded")
        match = self._match(identity)
        if match is None:
            raise PermissionDenied(f"{identity.name} is not on the authorization whitelist")
        name, client = match
        if client.role is Role.ADMIN or job is None or job.owner == name:
            return True
        raise job_not_found(job.job_id)


def _read_whitelist(path: Path) -> dict[str, _Client]:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"authorization whitelist {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"cannot read authorization whitelist {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    unknown = sorted(set(doc) - {"clients"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; expected [[clients]] entries")
    entries = doc.get("clients", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"{path} lists no clients, so nobody could call the server: add "
            '[[clients]] entries with identity = "NAME" and role = "user" or "admin"'
        )
    clients: dict[str, _Client] = {}
    for index, entry in enumerate(entries):
        identity, client = _parse_entry(path, index, entry)
        if identity in clients:
            raise ConfigError(
                f"{path}: clients entry {index + 1}: identity {identity!r} is listed twice"
            )
        clients[identity] = client
    return clients

"""The ``isolation`` built-in plugin: every job unprivileged, in its own namespaces.

Loaded by every server, like ``authz``. For each job it builds the
:class:`jobworker.backends.local.isolation.IsolationPlan` the launcher carries out (see that module
for
what a job then sees): the account comes from the client's ``run_as`` list in the
whitelist (its first entry by default) or, for a client without one, ``--job-user``
(``nobody`` unless told otherwise); the server's own files (TLS material, whitelist, CRL,
audit log, spool) are hidden from the job.

A server running as root switches jobs to the account. A server that is not root runs
each job in a user namespace (the job is ``nobody`` inside, the server's uid outside), so
the Quickstart's dev PKI in the user's home is still hidden. A server that can do neither
refuses to start unless ``--no-isolation`` says to run jobs with the server's own power.
"""

from __future__ import annotations

import argparse
import os
import pwd
from collections.abc import Sequence
from pathlib import Path

import attrs
import structlog

from jobworker.backends.local.isolation import Account, IsolationPlan
from jobworker.backends.local.spool import default_root
from jobworker.errors import ConfigError, FailedPrecondition, PermissionDenied
from jobworker.hooks import hookimpl
from jobworker.jobspec import JobSpec, Network

log = structlog.get_logger("jobworker.backends.local.isolation")

DEFAULT_JOB_USER = "nobody"
#: Directories too shared to hide whole: a state file kept directly in one is hidden alone.
_SHARED_DIRS = frozenset(
    {"/", "/etc", "/usr", "/var", "/var/lib", "/var/log", "/run", "/tmp", "/var/tmp"}
    | {"/home", "/root", "/srv", "/opt"}
)
#: Options of ``jobworker serve`` (and of built-in plugins) that name the server's own files.
_STATE_OPTIONS = ("tls_cert", "tls_key", "tls_ca", "tls_crl", "authz", "audit_log")


def _hidden_paths(options: argparse.Namespace) -> list[str]:
    """What a job must not see: each state file's own directory, or the file alone."""
    paths: list[str] = []
    for name in _STATE_OPTIONS:
        value = getattr(options, name, None)
        if not value:
            continue
        path = Path(value).absolute()
        parent = str(path.parent)
        paths.append(str(path) if parent in _SHARED_DIRS else parent)
    spool = getattr(options, "spool_dir", None)
    paths.append(str(Path(spool).absolute() if spool else default_root()))
    paths += [str(Path(p).absolute()) for p in getattr(options, "isolation_hide", None) or ()]
    return list(dict.fromkeys(paths))


def user_namespaces_available() -> bool:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text()) > 0
    except (OSError, ValueError):
        return False


@attrs.define
class Isolation:
    """One server's isolation settings; ``enabled`` False only with ``--no-isolation``."""

    #: One line for `jobworker plugins`.
    description = "each job in its own namespaces, as an unprivileged account, host read-only"

    enabled: bool = True
    default_user: str = DEFAULT_JOB_USER
    network: Network = Network.HOST
    network_fixed: bool = False
    user_namespace: bool = attrs.field(factory=lambda: os.geteuid() != 0)
    hide: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        """What ``jobworker plugins`` and the start-up log say is in effect."""
        if not self.enabled:
            return "off (--no-isolation): jobs run with the server's uid and capabilities"
        how = (
            "user namespace" if self.user_namespace else f"uid switch (default {self.default_user})"
        )
        return f"namespaces (pid, mount, ipc, uts, cgroup; network {self.network.value}), {how}"

    # -- set-up --------------------------------------------------------------------------

    @hookimpl
    def jobworker_add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("isolation")
        group.add_argument(
            "--job-user",
            metavar="NAME",
            default=DEFAULT_JOB_USER,
            help="account for jobs of clients with no run_as list in the whitelist"
            f" (default {DEFAULT_JOB_USER}; never root)",
        )
        group.add_argument(
            "--job-network",
            choices=[n.value for n in Network],
            default=Network.HOST.value,
            help="network of jobs that ask for none: the host's, or only a loopback",
        )
        group.add_argument(
            "--job-network-fixed",
            action="store_true",
            help="clients may not choose another network than --job-network",
        )
        group.add_argument(
            "--isolation-hide",
            action="append",
            metavar="PATH",
            help="also hide PATH from jobs (repeatable)",
        )
        group.add_argument(
            "--isolation-writable",
            action="append",
            metavar="DIR",
            help="let jobs write DIR, within its permissions (the rest is read-only)",
        )
        group.add_argument(
            "--no-isolation",
            action="store_true",
            help="UNSAFE: run jobs with the server's own uid, capabilities and namespaces",
        )

    @hookimpl
    def jobworker_configure(self, options: argparse.Namespace) -> None:
        if getattr(options, "no_isolation", False):
            self.enabled = False
            log.warning("isolation_disabled", mode=self.mode)
            return
        self.default_user = getattr(options, "job_user", None) or DEFAULT_JOB_USER
        self.network = Network(getattr(options, "job_network", None) or Network.HOST.value)
        self.network_fixed = bool(getattr(options, "job_network_fixed", False))
        self.hide = tuple(_hidden_paths(options))
        self.writable = tuple(getattr(options, "isolation_writable", None) or ())
        if self.user_namespace and not user_namespaces_available():
            raise ConfigError(
                "cannot isolate jobs: the server is not root and this kernel allows no user"
                " namespaces (/proc/sys/user/max_user_namespaces); run as root, enable them,"
                " or pass --no-isolation to run jobs with the server's own uid (unsafe)"
            )
        if not self.user_namespace:
            try:
                account = Account.lookup(self.default_user)
            except KeyError:
                raise ConfigError(
                    f"--job-user {self.default_user!r}: no such account on this host"
                ) from None
            if account.is_root:
                raise ConfigError(
                    "--job-user must not be root (it would give every client root); list"
                    ' root in the run_as of the clients that need it: run_as = ["root"]'
                )
        log.info("isolation_ready", mode=self.mode, hidden=list(self.hide))

    # -- per job -------------------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def jobworker_isolate(
        self, spec: JobSpec, owner: str, accounts: Sequence[str] | None
    ) -> IsolationPlan | None:
        if not self.enabled:
            if spec.user is not None or spec.network is not None:
                raise FailedPrecondition(
                    "this server runs jobs without isolation (--no-isolation): it cannot"
                    " honour --user or --network"
                )
            log.warning("job_not_isolated", owner=owner, mode=self.mode)
            return None
        return IsolationPlan(
            account=self._account(spec, owner, accounts),
            network=self._network(spec),
            user_namespace=self.user_namespace,
            hide=self.hide,
            writable=self.writable,
        )

    def _account(self, spec: JobSpec, owner: str, accounts: Sequence[str] | None) -> Account:
        allowed = list(accounts) if accounts else [self.default_user]
        name = spec.user or allowed[0]
        if name not in allowed:
            raise PermissionDenied(
                f"{owner!r} may not run jobs as {name!r}; allowed: {', '.join(allowed)}"
            )
        if self.user_namespace:
            own = pwd.getpwuid(os.getuid()).pw_name
            if spec.user is not None and spec.user != own:
                raise FailedPrecondition(
                    f"this server is not root: it runs every job as its own account ({own})"
                    f" in a user namespace and cannot run one as {spec.user!r}"
                )
            name = own
        try:
            return Account.lookup(name)
        except KeyError:
            raise FailedPrecondition(f"account {name!r} does not exist on this host") from None

    def _network(self, spec: JobSpec) -> Network:
        if spec.network is None:
            return self.network
        asked = Network(spec.network)
        if self.network_fixed and asked is not self.network:
            raise PermissionDenied(
                f"this server runs every job with network {self.network.value}"
                " (--job-network-fixed)"
            )
        return asked

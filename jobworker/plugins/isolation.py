"""The ``isolation`` built-in plugin: every job unprivileged, in its own namespaces.

Loaded by every server, like ``authz``. For each job it builds the
:class:`jobworker.backends.local.isolation.IsolationPlan` the launcher carries out (see
that module for what a job then sees). The account comes from the client's ``run_as``
list in the whitelist (its first entry by default); a client without one gets a uid of its
own for each job, from ``--job-uid-range`` (:mod:`jobworker.backends.local.uids`), unless
the operator names one shared account with ``--job-user``. The server's own files (TLS
material, whitelist, CRL, audit log, spool) are hidden from the job. Its kernel resources
are bounded: one tmpfs of ``--job-tmp-size`` (at most its ``--memory``) behind its /tmp,
/var/tmp and /dev/shm, and, for a uid only it has, RLIMIT_NPROC at ``--pids`` (or the
server's default): a bound per job even where no cgroup pids controller is.

A server running as root switches jobs to the account. A server that is not root runs
each job in a user namespace (the job is ``nobody`` inside, the server's uid outside), so
the Quickstart's dev PKI in the user's home is still hidden; it cannot switch uids and
draws none, but the namespace gives each job keyrings and a process count of its own. A
server that can do neither refuses to start unless ``--no-isolation`` says to run jobs
with the server's own power.

Jobs get a ``private`` network by default (:mod:`jobworker.backends.local.network`):
a way out, none to the host nor to the ``--job-network-deny`` networks. ``none`` is a
loopback alone; ``host`` is the host's own network, for clients the whitelist grants it
(``networks = ["host"]``) or, for every job, an operator's ``--job-network host``.
"""

from __future__ import annotations

import argparse
import os
import pwd
from collections.abc import Sequence
from pathlib import Path

import attrs
import structlog

from jobworker.backends.local.isolation import (
    DEFAULT_PIDS,
    DEFAULT_TMP_SIZE,
    Account,
    IsolationPlan,
)
from jobworker.backends.local.network import Net, PrivateNetwork, parse_cidr
from jobworker.backends.local.spool import default_root
from jobworker.backends.local.uids import DEFAULT_RANGE, UidPool, UidRange
from jobworker.cli.common import argument
from jobworker.errors import ConfigError, FailedPrecondition, PermissionDenied
from jobworker.hooks import hookimpl
from jobworker.jobspec import JobSpec, Network
from jobworker.model import JobStatus
from jobworker.units import format_size, parse_size

log = structlog.get_logger("jobworker.backends.local.isolation")

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
    #: One account for every job of clients without ``run_as``; None: a uid per job.
    default_user: str | None = None
    network: Network = Network.PRIVATE
    network_fixed: bool = False
    user_namespace: bool = attrs.field(factory=lambda: os.geteuid() != 0)
    hide: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    uid_range: UidRange = attrs.field(factory=lambda: UidRange.parse(DEFAULT_RANGE))
    tmp_size: int | None = DEFAULT_TMP_SIZE
    #: RLIMIT_NPROC of a job with a uid of its own and no ``--pids``; None: none.
    default_pids: int | None = DEFAULT_PIDS
    network_deny: tuple[Net, ...] = ()
    #: Found at start-up when ``private`` is the default, else at the first private job.
    private_network: PrivateNetwork | None = None
    _uids: UidPool | None = None

    @property
    def mode(self) -> str:
        """What ``jobworker plugins`` and the start-up log say is in effect."""
        if not self.enabled:
            return "off (--no-isolation): jobs run with the server's uid and capabilities"
        if self.user_namespace:
            how = "user namespace"
        elif self.default_user is None:
            how = f"uid switch (a uid per job from {self.uid_range})"
        else:
            how = f"uid switch (default {self.default_user})"
        return f"namespaces (pid, mount, ipc, uts, cgroup; network {self.network.value}), {how}"

    # -- set-up --------------------------------------------------------------------------

    @hookimpl
    def jobworker_add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("isolation")
        group.add_argument(
            "--job-user",
            metavar="NAME",
            help="one account for every job of clients with no run_as list in the whitelist,"
            " shared between them (never root; default: a uid of its own for each job)",
        )
        group.add_argument(
            "--job-uid-range",
            metavar="FIRST-LAST",
            type=argument(UidRange.parse),
            default=UidRange.parse(DEFAULT_RANGE),
            help="uids jobs draw their own from; give servers on one host ranges no account"
            f" uses (default {DEFAULT_RANGE}, systemd's DynamicUser range)",
        )
        group.add_argument(
            "--job-tmp-size",
            metavar="SIZE",
            type=argument(parse_size),
            default=DEFAULT_TMP_SIZE,
            help="room in a job's private /tmp, /var/tmp and /dev/shm together, at most its"
            f" --memory (default {format_size(DEFAULT_TMP_SIZE)})",
        )
        group.add_argument(
            "--job-network",
            choices=[n.value for n in Network],
            default=Network.PRIVATE.value,
            help="network of jobs that ask for none: private (their own, a way out but none"
            " to this host, link-local or --job-network-deny), none (only a loopback), or"
            " host (this host's, every job: UNSAFE for clients that do not trust each other)",
        )
        group.add_argument(
            "--job-network-deny",
            action="append",
            metavar="CIDR",
            help="private networks reach nothing in CIDR either, e.g. the LAN or a cluster's"
            " network (repeatable)",
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
        self.default_user = getattr(options, "job_user", None)
        self.network = Network(getattr(options, "job_network", None) or Network.PRIVATE.value)
        self.network_fixed = bool(getattr(options, "job_network_fixed", False))
        deny = getattr(options, "job_network_deny", None) or ()
        self.network_deny = tuple(parse_cidr(text) for text in deny)
        self.hide = tuple(_hidden_paths(options))
        self.writable = tuple(getattr(options, "isolation_writable", None) or ())
        self.uid_range = getattr(options, "job_uid_range", None) or self.uid_range
        self.tmp_size = getattr(options, "job_tmp_size", None) or self.tmp_size
        # The cgroupv2 plugin's default where it is loaded: one number for both bounds.
        self.default_pids = getattr(options, "cgroup_default_pids", DEFAULT_PIDS) or None
        if self.user_namespace and not user_namespaces_available():
            raise ConfigError(
                "cannot isolate jobs: the server is not root and this kernel allows no user"
                " namespaces (/proc/sys/user/max_user_namespaces); run as root, enable them,"
                " or pass --no-isolation to run jobs with the server's own uid (unsafe)"
            )
        if not self.user_namespace and self.default_user is None:
            taken = [e for e in pwd.getpwall() if e.pw_uid in self.uid_range]
            if taken:
                names = ", ".join(f"{e.pw_name}({e.pw_uid})" for e in taken[:5])
                raise ConfigError(
                    f"--job-uid-range {self.uid_range} holds accounts of this host ({names}):"
                    " jobs would run as them; choose a range no account uses"
                )
            self._uids = UidPool(self.uid_range, self.writable)
            try:
                self._uids.open()
            except OSError as err:
                raise ConfigError(
                    f"cannot draw job uids: {err.filename}: {err.strerror}; --job-user NAME"
                    " runs every job as one account instead"
                ) from None
        elif not self.user_namespace and self.default_user is not None:
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
        if self.network is Network.PRIVATE:
            self.private_network = PrivateNetwork.find(self.network_deny, self.user_namespace)
        elif self.network is Network.HOST:
            log.warning("job_network_host", note="every job shares this host's network")
        log.info("isolation_ready", mode=self.mode, hidden=list(self.hide))

    @hookimpl
    def jobworker_start_refused(self, job_id: str) -> None:
        if self._uids is not None:
            self._uids.release(job_id)

    @hookimpl
    def jobworker_on_exit(self, status: JobStatus) -> None:
        if self._uids is not None:
            self._uids.release(status.job_id)

    @hookimpl
    def jobworker_shutdown(self) -> None:
        if self._uids is not None:
            self._uids.close()

    # -- per job -------------------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def jobworker_isolate(
        self,
        job_id: str,
        spec: JobSpec,
        owner: str,
        accounts: Sequence[str] | None,
        networks: Sequence[str] | None,
    ) -> IsolationPlan | None:
        if not self.enabled:
            if spec.user is not None or spec.network is not None:
                raise FailedPrecondition(
                    "this server runs jobs without isolation (--no-isolation): it cannot"
                    " honour --user or --network"
                )
            log.warning("job_not_isolated", owner=owner, mode=self.mode)
            return None
        network = self._network(spec, owner, networks)
        account = self._account(job_id, spec, owner, accounts)
        return IsolationPlan(
            account=account,
            network=network,
            user_namespace=self.user_namespace,
            hide=self.hide,
            writable=self.writable,
            tmp_size=self._tmp_size(spec),
            nproc=self._nproc(spec, account),
            private_network=self._private_network() if network is Network.PRIVATE else None,
        )

    def _account(
        self, job_id: str, spec: JobSpec, owner: str, accounts: Sequence[str] | None
    ) -> Account:
        allowed = list(accounts) if accounts else []
        if not allowed and self.default_user is not None:
            allowed = [self.default_user]
        name = spec.user or (allowed[0] if allowed else None)
        if name is not None and name not in allowed:
            granted = ", ".join(allowed) or "none (each job runs as a uid of its own)"
            raise PermissionDenied(f"{owner!r} may not run jobs as {name!r}; allowed: {granted}")
        if self.user_namespace:
            own = pwd.getpwuid(os.getuid()).pw_name
            if spec.user is not None and spec.user != own:
                raise FailedPrecondition(
                    f"this server is not root: it runs every job as its own account ({own})"
                    f" in a user namespace and cannot run one as {spec.user!r}"
                )
            name = own
        if name is None:
            if self._uids is None:  # a plugin made without options (tests, embedders)
                self._uids = UidPool(self.uid_range, self.writable)
            return Account.of_job(self._uids.allocate(job_id))
        try:
            return Account.lookup(name)
        except KeyError:
            raise FailedPrecondition(f"account {name!r} does not exist on this host") from None

    def _tmp_size(self, spec: JobSpec) -> int | None:
        """Counted against the job's memory: its tmpfs never holds more than --memory."""
        memory = spec.limits.memory
        if memory is None or self.tmp_size is None:
            return self.tmp_size if memory is None else memory
        return min(self.tmp_size, memory)

    def _nproc(self, spec: JobSpec, account: Account) -> int | None:
        """RLIMIT_NPROC counts every process of the uid: by default only where the uid is
        the job's alone; an explicit ``--pids`` bounds a shared account too (its other
        processes then count as well). The kernel never applies it to root."""
        if account.dynamic or self.user_namespace:
            return spec.limits.pids or self.default_pids
        return None if account.is_root else spec.limits.pids

    def _network(self, spec: JobSpec, owner: str, networks: Sequence[str] | None) -> Network:
        if spec.network is None:
            return self.network
        asked = Network(spec.network)
        if self.network_fixed and asked is not self.network:
            raise PermissionDenied(
                f"this server runs every job with network {self.network.value}"
                " (--job-network-fixed)"
            )
        if asked is Network.HOST and asked is not self.network and "host" not in (networks or ()):
            raise PermissionDenied(
                f"{owner!r} may not use the host's network: the whitelist grants it with"
                ' networks = ["host"]; use --network private (the default) or none'
            )
        return asked

    def _private_network(self) -> PrivateNetwork:
        if self.private_network is None:
            try:
                self.private_network = PrivateNetwork.find(self.network_deny, self.user_namespace)
            except ConfigError as err:
                raise FailedPrecondition(str(err)) from None
        return self.private_network

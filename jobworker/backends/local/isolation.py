"""What isolating a job means: the plan the launcher carries out in the job's first process.

A plan is data, not code: the launcher (``_launcher.py`` and the ``_launcher_*.py`` modules
it loads) runs with no imports beyond the interpreter's built-ins, so plugins cannot run
Python in the child. Instead the ``jobworker_isolate`` hook builds an
:class:`IsolationPlan` on the server, and the launcher applies it between joining the job's
containment and ``execve``, in this order:

1. new namespaces (user when the server is not root, then mount, PID, IPC, UTS, network;
   the cgroup namespace right after joining the job's cgroup, so it is rooted there);
2. as PID 1 of the new PID namespace: a private mount tree; every mount read-only and
   nosuid; ``writable`` paths bound back read-write; its own ``/proc``; ``/sys/fs/cgroup``
   showing only the job's cgroup (or nothing); ``hide`` paths covered by an empty
   read-only mount; ``private_tmp`` paths share one fresh tmpfs of ``tmp_size`` bytes;
   loopback up if the network namespace is new (a ``private`` network is connected
   before, by the launcher: see :mod:`jobworker.backends.local.network`);
3. a child that caps its uid's processes at ``nproc`` (RLIMIT_NPROC), drops to the plan's
   account (groups, gid, uid), empties the capability bounding, inheritable and ambient
   sets for non-root accounts, joins a session keyring of its own (and, for a uid of its
   own, empties the uid's user keyrings), sets ``no_new_privs`` and ``execve``s
   ``wrapper + command``; PID 1 stays behind to reap orphans and report the command's wait
   status to the server, so stops, exit codes and 128+N keep working.

A third-party plugin extends the plan (``attrs.evolve``): more hidden paths, a network
forced to ``none``, or an exec ``wrapper`` (a seccomp loader, ``aa-exec -p PROFILE --``, a
Landlock sandboxer) that runs, already unprivileged, before the command.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable

import attrs

from jobworker.backends.local.network import PrivateNetwork
from jobworker.jobspec import Limits, Network
from jobworker.units import format_size

# clone(2) flags, as the kernel numbers them.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: Where a job's working directory is when its spec names none: its own private /tmp.
DEFAULT_WORKDIR = "/tmp"
#: Fresh, empty, job-owned directories, all on one tmpfs of the plan's ``tmp_size``.
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")
#: Room in those directories together (``serve --job-tmp-size``): tmpfs is memory, and
#: without a size each mount could take half of the host's.
DEFAULT_TMP_SIZE = 1 << 30
#: Processes (tasks) of a job's uid when neither ``--pids`` nor the server says otherwise.
DEFAULT_PIDS = 1024
#: A dynamic uid's account name, for USER, status and logs (the uid has no passwd entry).
DYNAMIC_NAME = "job-{uid}"


def _paths(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(os.path.normpath(p) for p in items))


@attrs.frozen
class Account:
    """The Unix account a job runs as, resolved on the server."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    home: str = "/"
    #: Drawn from the server's uid range for this job alone (:mod:`.uids`), not an account
    #: of the host: its keyrings are emptied before the job runs.
    dynamic: bool = False

    @classmethod
    def of_job(cls, uid: int) -> Account:
        """The account of a job with a uid of its own: a group of the same number, no
        other group, its private /tmp as home."""
        return cls(DYNAMIC_NAME.format(uid=uid), uid, uid, (), DEFAULT_WORKDIR, dynamic=True)

    @classmethod
    def lookup(cls, name: str) -> Account:
        """Resolve ``name`` through the host's passwd and group databases.

        Raises KeyError when the account does not exist.
        """
        entry = pwd.getpwnam(name)
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir or "/")

    @property
    def is_root(self) -> bool:
        return self.uid == 0


@attrs.frozen
class IsolationPlan:
    """How one job is isolated; see the module docstring for the order it is applied in."""

    account: Account
    network: Network = Network.HOST
    #: Run in a user namespace, as ``nobody`` inside and the server's uid outside: what a
    #: server that is not root can do. The account then only names HOME and USER.
    user_namespace: bool = False
    hide: tuple[str, ...] = attrs.field(default=(), converter=_paths)
    writable: tuple[str, ...] = attrs.field(default=(), converter=_paths)
    private_tmp: tuple[str, ...] = attrs.field(default=PRIVATE_TMP, converter=_paths)
    wrapper: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: Bytes of the one tmpfs behind ``private_tmp``; None: the kernel's default (half of RAM).
    tmp_size: int | None = DEFAULT_TMP_SIZE
    #: RLIMIT_NPROC of the job's uid; None: inherited. Only for a uid no other job or
    #: session shares (a dynamic uid, a user namespace), where it bounds this job alone.
    nproc: int | None = None
    #: The server's means for a ``private`` network (its tools, the operator's deny list).
    private_network: PrivateNetwork | None = attrs.field(default=None)

    @private_network.validator
    def _check_private_network(self, _attribute: object, value: PrivateNetwork | None) -> None:
        if self.network is Network.PRIVATE and value is None:
            raise ValueError("a private network needs the server's PrivateNetwork")

    @property
    def relayed(self) -> bool:
        """Whether a relay forks PID 1 even when the zygote starts the job: a private
        network's helper must be forked before the job's namespaces exist."""
        return self.network is Network.PRIVATE

    @property
    def clone_flags(self) -> int:
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
        if self.network is not Network.HOST:
            flags |= CLONE_NEWNET
        if self.user_namespace:
            flags |= CLONE_NEWUSER
        return flags

    def describe(self) -> str:
        """One line for status and logs, e.g. ``namespaces, user nobody(65534), network none``."""
        mode = "user namespace" if self.user_namespace else "namespaces"
        return f"{mode}, user {self.account.name}({self.account.uid}), network {self.network.value}"

    def enforced(self) -> list[str]:
        """The kernel bounds this plan sets, one phrase each, for status."""
        bounds = []
        if self.nproc is not None:
            bounds.append(f"pids {self.nproc} (RLIMIT_NPROC of the job's uid)")
        if self.tmp_size is not None and self.private_tmp:
            where = ", ".join(self.private_tmp)
            bounds.append(f"tmpfs {format_size(self.tmp_size)} ({where} together)")
        return bounds

    def launcher_fields(self, host_uid: int, host_gid: int) -> list[str]:
        """The plan as the launcher reads it: ``key=value`` fields (values hold no NUL)."""
        account = self.account
        uid, gid, groups = account.uid, account.gid, account.groups
        fields = [f"ns={self.clone_flags}"]
        if self.user_namespace:
            # Only one id can be mapped without privilege: the server's, seen as nobody.
            uid = gid = 65534
            groups = ()
            fields += [f"map_uid={host_uid}", f"map_gid={host_gid}"]
        fields += [f"uid={uid}", f"gid={gid}", "groups=" + ",".join(map(str, groups))]
        fields += [f"writable={p}" for p in self.writable]
        fields += [f"hide={p}" for p in self.hide]
        fields += [f"tmp={p}" for p in self.private_tmp]
        if self.tmp_size is not None:
            fields.append(f"tmp_size={self.tmp_size}")
        if self.nproc is not None:
            fields.append(f"nproc={self.nproc}")
        if account.dynamic and not self.user_namespace:
            fields.append("keyrings=empty")
        fields += [f"wrap={a}" for a in self.wrapper]
        if self.network is Network.PRIVATE and self.private_network is not None:
            fields += self.private_network.launcher_fields()
        return fields


def enforced_limits(applied: Limits, plan: IsolationPlan | None) -> tuple[str, ...]:
    """Every kernel bound on a job, for its status: its cgroup's limits, then its plan's;
    ``memory: none`` and ``pids: none`` where nothing bounds them."""
    phrases = []
    if applied.cpu is not None:
        phrases.append(f"cpu {applied.cpu:g} cores (cpu.max)")
    if applied.cpu_weight is not None:
        phrases.append(f"cpu weight {applied.cpu_weight} (cpu.weight)")
    if applied.memory is not None:
        phrases.append(f"memory {format_size(applied.memory)} (memory.max)")
    if applied.memory_high is not None:
        phrases.append(f"memory high {format_size(applied.memory_high)} (memory.high)")
    if applied.pids is not None:
        phrases.append(f"pids {applied.pids} (pids.max)")
    for io in applied.io:
        rates = ((key, getattr(io, key)) for key in ("rbps", "wbps", "riops", "wiops"))
        given = " ".join(f"{key}={value}" for key, value in rates if value is not None)
        phrases.append(f"io {io.device} {given} (io.max)")
    phrases += [] if plan is None else plan.enforced()
    if applied.memory is None:
        phrases.append("memory: none")
    if applied.pids is None and (plan is None or plan.nproc is None):
        phrases.append("pids: none")
    return tuple(phrases)

"""The ``cgroupv2`` plugin: every job in its own cgroup v2, with its limits and accounting.

Layout (docs/cgroups.md explains why): ``<root>/<job_id>`` per job, created and limited
before the job's first process exists; the launcher joins it by writing ``0`` to its
``cgroup.procs``. Stopping signals every process in the cgroup and ends with
``cgroup.kill``, so processes that left the job's session are stopped too. Empty is
learnt from ``cgroup.events`` through inotify, never by polling.

:class:`CgroupV2Plugin` is the plugin: ``--plugin cgroupv2`` makes one with no arguments and
its ``jobworker_configure`` applies the ``--cgroup-*`` options; tests and embedders register
a ``CgroupV2Plugin(root=...)`` instance directly. How a job's limits become control file writes
is :mod:`jobworker.plugins.cgrouplimits`.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import attrs
import structlog

from jobworker.backends.base import JobBackend
from jobworker.backends.local.cgroupfs import (
    CGROUP_FS,
    HYBRID_MOUNT,
    NAME_PREFIX,
    ROOT_NAME,
    SYS_DEV_BLOCK,
    JobCgroup,
    RootLock,
    cgroup2_mounts,
    default_root,
    is_ours,
    mark_ours,
    own_cgroup,
    read_int,
    write_file,
)
from jobworker.backends.local.inotify import wait_until_blocking
from jobworker.backends.local.isolation import DEFAULT_PIDS
from jobworker.cli.common import argument
from jobworker.errors import ConfigError, FailedPrecondition, InvalidArgument
from jobworker.hooks import hookimpl
from jobworker.jobspec import JobSpec, Limits
from jobworker.plugins.cgrouplimits import MIN_MEMORY, LimitPlanner
from jobworker.units import format_size, parse_size

log = structlog.get_logger("jobworker.cgroupv2")

#: ``--cgroup-root delegated``: jobs go under the cgroup systemd delegated to the server.
DELEGATED = "delegated"
DELEGATED_JOBS = "jobs"
#: The leaf the server moves itself into when it sits where controllers must be enabled.
SERVER_LEAF = "jobworker-server"
CONTROLLERS = ("cpu", "io", "memory", "pids")
#: How long start-up and shutdown wait for a killed leftover cgroup to empty.
LEFTOVER_TIMEOUT = 5.0

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _settings(options: argparse.Namespace) -> dict[str, Any]:
    """The plugin's settings from the options its ``jobworker_add_options`` added."""
    if options.cgroup_default_pids < 0:
        raise ConfigError("--cgroup-default-pids must be 0 (no default) or more")
    default, most = options.cgroup_default_memory, options.cgroup_max_memory
    for flag, value in (("--cgroup-default-memory", default), ("--cgroup-max-memory", most)):
        if value is not None and value < MIN_MEMORY:
            raise ConfigError(f"{flag} {value} bytes is too small: give at least 1M")
    if default is not None and most is not None and default > most:
        raise ConfigError(
            f"--cgroup-default-memory {format_size(default)} is above --cgroup-max-memory"
            f" {format_size(most)}: lower the default or raise the maximum"
        )
    delegated = options.cgroup_root == DELEGATED
    return {
        "root": None if delegated else options.cgroup_root,
        "delegated": delegated,
        "default_pids": options.cgroup_default_pids or None,
        "default_memory": default,
        "max_memory": most,
        "allow_swap": options.cgroup_swap == "allow",
        # With isolation each job's uid is its own: RLIMIT_NPROC bounds it where no pids
        # controller can (the isolation plugin sets it).
        "pids_by_rlimit": not getattr(options, "no_isolation", False),
    }


@attrs.define(eq=False)
class CgroupV2Plugin:
    """Creates, limits and removes job cgroups under ``root``.

    ``root=None`` picks the default under the detected cgroup2 mount; ``delegated=True``
    uses ``<the server's own cgroup>/jobs`` (systemd ``Delegate=yes``). ``mount`` and
    ``self_cgroup`` are detected from /proc unless given (tests pass a fake cgroupfs).
    """

    #: One line for `jobworker plugins`.
    description = "puts each job in a cgroup v2: CPU, memory, IO and pids limits, usage, tree-kill"

    root: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    delegated: bool = False
    default_pids: int | None = DEFAULT_PIDS
    #: memory.max of a job that sets no ``--memory`` (None: none, or ``max_memory``).
    default_memory: int | None = None
    #: The most ``--memory`` (and ``--memory-high``) a job may ask for; None: any.
    max_memory: int | None = None
    allow_swap: bool = False
    #: Without a pids controller, ``--pids`` is still accepted: the isolation plugin bounds
    #: the job's own uid with RLIMIT_NPROC. False (``--no-isolation``): refused.
    pids_by_rlimit: bool = True
    mount: Path | None = None
    self_cgroup: Path | None = None
    cpus: int = attrs.field(factory=lambda: os.cpu_count() or 1)
    sys_dev_block: Path = SYS_DEV_BLOCK
    #: ``serve --live-restore``: :meth:`shutdown` leaves the job cgroups (their jobs run
    #: on, for the next server to adopt).
    live_restore: bool = False
    #: Job cgroups a live restore adopted: never leftovers (see :meth:`claim`).
    _adopted: set[Path] = attrs.Factory(set)
    _available: frozenset[str] = frozenset()
    _enabled: frozenset[str] = frozenset()
    _created_root: bool = False
    _prepared: bool = False
    _ready: bool = False
    _swept: bool = False
    _lock: RootLock | None = None

    @classmethod
    def from_options(cls, options: argparse.Namespace) -> CgroupV2Plugin:
        return cls(**_settings(options))

    @property
    def enabled(self) -> frozenset[str]:
        """Controllers a job cgroup gets."""
        return self._enabled

    # -- set-up and shutdown -------------------------------------------------------------

    def prepare(self) -> None:
        """Find the hierarchy, create the root, enable controllers: what ``serve`` checks
        before it listens. Takes nothing and removes nothing (see :meth:`setup`)."""
        if self._prepared:
            return
        mounts = self._mounts()
        if self.self_cgroup is None:
            self.self_cgroup = self._detect_self(mounts)
        if self.delegated:
            if self.self_cgroup is None:
                raise ConfigError(
                    "--cgroup-root delegated: this process's cgroup is not visible in a "
                    "cgroup2 mount; run it from a systemd unit with Delegate=yes"
                )
            self.root = self.self_cgroup / DELEGATED_JOBS
        if self.root is None:
            self.root = default_root(mounts)
        mount = self.mount = self._mount_of(self.root, mounts)
        self._available = frozenset((mount / "cgroup.controllers").read_text().split())
        chain = [mount]
        for part in self.root.relative_to(mount).parts:
            chain.append(chain[-1] / part)
        self._create(chain[1:])
        if not (self.root / "cgroup.kill").exists():
            raise ConfigError(
                f"{self.root} has no cgroup.kill: the cgroupv2 plugin needs Linux 5.14 or "
                "newer to stop a job's whole process tree"
            )
        self._enabled = self._enable(chain, self._available & set(CONTROLLERS))
        self._prepared = True

    def setup(self) -> None:
        """:meth:`prepare`, then take the root for this server: a second server on it is
        refused, naming the holder. Removes nothing (:meth:`claim` does)."""
        if self._ready:
            return
        self.prepare()
        assert self.root is not None and self.mount is not None
        self._lock = RootLock(self.root)
        self._ready = True
        mount = self.mount
        planner = self._planner()
        unusable = sorted(set(CONTROLLERS) - self._enabled)
        log.info(
            "cgroup_ready",
            root=str(self.root),
            mount=str(mount),
            available=sorted(self._available),
            enabled=sorted(self._enabled),
            unusable=unusable,
            default_pids=planner.pids_default_by(),
            default_memory=self.default_memory if "memory" in self._enabled else None,
            max_memory=self.max_memory,
            held_by=os.getpid(),
        )
        refused = planner.refused_flags()
        if refused:
            log.warning(
                "cgroup_limits_unenforceable",
                refused=refused,
                missing_controllers=unusable,
                available=sorted(self._available),
                mount=str(mount),
                consequence="jobs still get a cgroup (containment, tree-kill); jobs asking"
                " for these limits are refused",
            )

    def claim(self) -> None:
        """:meth:`setup`, then remove the leftovers of the root's previous owner, once:
        only cgroups marked as created by a server that held this root (``OWNER_XATTR``),
        and none a live restore adopted (``jobworker_limits_restore``).

        Called once the server listens and has adopted its jobs (``jobworker_manager_ready``,
        local jobs only: a Ray front's options are for its nodes), or by the first job (a
        Ray node agent).
        """
        self.setup()
        if self._swept:
            return
        self._swept = True
        removed, foreign = self._remove_jobs(keep=frozenset(self._adopted))
        log.info("cgroup_leftovers_removed", removed=removed, adopted=len(self._adopted))
        if foreign:
            log.warning(
                "cgroup_foreign_kept",
                root=str(self.root),
                cgroups=foreign[:10],
                reason="not marked as created by a jobworker server that held this root",
            )

    def shutdown(self) -> None:
        """Remove the remaining job cgroups, and the root if this plugin created it; let
        the root go."""
        if not self._ready or self.root is None:
            return
        if not self.live_restore:
            self._remove_jobs()
        if self._created_root:
            try:
                os.rmdir(self.root)
            except OSError as err:  # e.g. the server's own leaf is inside it
                log.info("cgroup_root_kept", root=str(self.root), reason=err.strerror)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._ready = self._prepared = self._swept = False

    def _mounts(self) -> dict[Path, str]:
        if self.mount is not None:
            return {self.mount: "/"}
        with open("/proc/self/mountinfo") as f:
            return cgroup2_mounts(f.read())

    def _detect_self(self, mounts: dict[Path, str]) -> Path | None:
        with open("/proc/self/cgroup") as f:
            proc_cgroup = f.read()
        for mount, source in mounts.items():
            found = own_cgroup(mount, source, proc_cgroup)
            if found is not None:
                return found
        return None

    @staticmethod
    def _mount_of(root: Path, mounts: dict[Path, str]) -> Path:
        below = [m for m in mounts if root != m and root.is_relative_to(m)]
        if not below:
            raise ConfigError(
                f"--cgroup-root {root} is not below a cgroup2 mount "
                f"(mounted: {', '.join(map(str, mounts)) or 'none'}); choose a directory "
                "below one, e.g. /sys/fs/cgroup/worker_jobs"
            )
        return max(below, key=lambda m: len(m.parts))

    def _create(self, cgroups: list[Path]) -> None:
        for cgroup in cgroups:
            try:
                os.mkdir(cgroup)
            except FileExistsError:
                continue
            except OSError as err:
                raise ConfigError(f"cannot create cgroup {cgroup}: {err.strerror}") from None
            if cgroup == self.root:
                self._created_root = True

    def _enable(self, chain: list[Path], wanted: frozenset[str]) -> frozenset[str]:
        """Enable ``wanted`` in every ``cgroup.subtree_control`` from the mount to the root.

        A cgroup with processes cannot enable controllers for its children (the
        no-internal-process rule), so if the server sits on that path it first moves itself
        into a leaf of its own. The mount's root cgroup is exempt from the rule.
        """
        enabled = set(wanted)
        for cgroup in chain:
            control = cgroup / "cgroup.subtree_control"
            missing = enabled - set(control.read_text().split())
            if not missing:
                continue
            if cgroup != chain[0] and cgroup == self.self_cgroup:
                self._move_self(cgroup / SERVER_LEAF)
            for controller in sorted(missing):
                try:
                    write_file(control, f"+{controller}")
                except OSError as err:
                    log.warning(
                        "cgroup_controller_unusable",
                        controller=controller,
                        cgroup=str(cgroup),
                        error=err.strerror,
                    )
                    enabled.discard(controller)
        return frozenset(enabled)

    def _move_self(self, leaf: Path) -> None:
        leaf.mkdir(exist_ok=True)
        write_file(leaf / "cgroup.procs", str(os.getpid()))
        log.info("cgroup_server_moved", cgroup=str(leaf))
        self.self_cgroup = leaf

    def _job_cgroups(self) -> list[JobCgroup]:
        """Children of the root, except the server's leaf and whatever holds the server."""
        assert self.root is not None
        jobs = []
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or child.name == SERVER_LEAF:
                continue
            if self.self_cgroup is not None and self.self_cgroup.is_relative_to(child):
                continue
            jobs.append(JobCgroup(child))
        return jobs

    def _remove_jobs(self, keep: frozenset[Path] = frozenset()) -> tuple[int, list[str]]:
        """Kill every job cgroup of this root's servers but ``keep``, wait for each to
        empty, remove it; how many, and the names of those left alone (not proven ours)."""
        jobs, foreign = [], []
        for job in self._job_cgroups():
            if job.path in keep:
                continue
            if is_ours(job.path):
                jobs.append(job)
            else:
                foreign.append(job.path.name)
        for job in jobs:
            job.kill()
        for job in jobs:
            if wait_until_blocking(job.path / "cgroup.events", job.is_empty, LEFTOVER_TIMEOUT):
                job.release()
            else:
                log.warning("cgroup_not_empty", cgroup=str(job.path), pids=job.pids())
        return len(jobs), foreign

    # -- per job -------------------------------------------------------------------------

    def create(self, job_id: str, spec: JobSpec) -> JobCgroup:
        """The job's cgroup with its limits written; nothing is left behind on error."""
        self.claim()
        assert self.root is not None
        if not _JOB_ID.fullmatch(job_id) or job_id == SERVER_LEAF:
            raise InvalidArgument(f"job id {job_id!r} cannot name a cgroup")
        plan = self._planner().plan(spec.limits)
        path = self.root / job_id
        try:
            os.mkdir(path)
        except OSError as err:
            raise FailedPrecondition(f"cannot create cgroup {path}: {err.strerror}") from None
        mark_ours(path)
        cgroup = JobCgroup(path)
        for name, value in plan.writes:
            try:
                write_file(path / name, value)
            except OSError as err:
                cgroup.release()
                raise FailedPrecondition(
                    f"the kernel refused {value!r} in {path / name}: {err.strerror}"
                ) from None
        cgroup.applied = plan.applied
        if plan.applied.memory is not None or plan.applied.memory_high is not None:
            # The kernel rounds memory limits down to whole pages: report what it holds.
            cgroup.applied = attrs.evolve(
                plan.applied,
                memory=read_int(path / "memory.max"),
                memory_high=read_int(path / "memory.high"),
            )
        log.debug("cgroup_created", cgroup=str(path), limits=plan.writes)
        return cgroup

    def _planner(self) -> LimitPlanner:
        assert self.root is not None and self.mount is not None
        return LimitPlanner(
            root=self.root,
            mount=self.mount,
            available=self._available,
            enabled=self._enabled,
            cpus=self.cpus,
            default_pids=self.default_pids,
            default_memory=self.default_memory,
            max_memory=self.max_memory,
            allow_swap=self.allow_swap,
            pids_by_rlimit=self.pids_by_rlimit,
            sys_dev_block=self.sys_dev_block,
        )

    # -- hooks -------------------------------------------------------------------------

    @hookimpl
    def jobworker_add_options(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            "cgroupv2", "Each job in its own cgroup v2 with its limits (docs/cgroups.md)."
        )
        group.add_argument(
            "--cgroup-root",
            dest="cgroup_root",
            metavar="PATH",
            help=f"the cgroup jobs are created under; {DELEGATED!r} for <the server's cgroup>/"
            f"{DELEGATED_JOBS} under systemd Delegate=yes (default: {ROOT_NAME} under the "
            f"cgroup2 mount, {CGROUP_FS} or {HYBRID_MOUNT} on a hybrid host)",
        )
        group.add_argument(
            "--cgroup-default-pids",
            dest="cgroup_default_pids",
            type=int,
            default=DEFAULT_PIDS,
            metavar="N",
            help="pids.max of a job that sets no --pids, so a fork bomb stays contained (its"
            " uid's RLIMIT_NPROC where no pids controller is);"
            f" 0 for none (default {DEFAULT_PIDS})",
        )
        group.add_argument(
            "--cgroup-default-memory",
            dest="cgroup_default_memory",
            type=argument(parse_size),
            metavar="SIZE",
            help="memory.max of a job that sets no --memory (default: --cgroup-max-memory,"
            " else none)",
        )
        group.add_argument(
            "--cgroup-max-memory",
            dest="cgroup_max_memory",
            type=argument(parse_size),
            metavar="SIZE",
            help="the most --memory or --memory-high a job may ask for; more is INVALID_ARGUMENT"
            " (default: no maximum)",
        )
        group.add_argument(
            "--cgroup-swap",
            dest="cgroup_swap",
            choices=("deny", "allow"),
            default="deny",
            help="whether a job with a memory limit may swap beyond it (default deny)",
        )

    @hookimpl
    def jobworker_configure(self, options: argparse.Namespace) -> None:
        if hasattr(options, "cgroup_root"):  # parsed with this plugin's options
            for name, value in _settings(options).items():
                setattr(self, name, value)
        self.live_restore = getattr(options, "live_restore", False)
        self.prepare()

    @hookimpl
    def jobworker_manager_ready(self, manager: JobBackend) -> None:
        """The server listens and has adopted its jobs: a server running jobs here takes
        its root and removes its leftovers now."""
        from jobworker.backends.local.manager import JobManager

        if isinstance(manager, JobManager):
            self.claim()

    @hookimpl
    def jobworker_limits_restore(
        self, job_id: str, containment: str, applied: Limits
    ) -> JobCgroup | None:
        if not containment.startswith(NAME_PREFIX):
            return None
        self.setup()
        path = Path(containment.removeprefix(NAME_PREFIX))
        if path.parent != self.root or path.name != job_id:
            raise FailedPrecondition(
                f"its cgroup {path} is not this server's (--cgroup-root {self.root})"
            )
        if not (path / "cgroup.procs").exists():
            raise FailedPrecondition(f"its cgroup {path} is gone")
        self._adopted.add(path)
        return JobCgroup(path, applied=applied)

    @hookimpl
    def jobworker_limits_apply(self, job_id: str, spec: JobSpec) -> JobCgroup:
        return self.create(job_id, spec)

    @hookimpl
    def jobworker_shutdown(self) -> None:
        self.shutdown()

"""Hook specifications: the life of a job as plugins see it.

Call order:

1. ``jobworker_add_options(parser)`` -- once, while ``jobworker serve`` builds its parser.
2. ``jobworker_configure(options)`` -- once, before the server accepts requests.
   ``jobworker_metrics_registry()`` (first result wins) and, when a plugin answered,
   ``jobworker_metrics_ready(registry)`` -- once, right after configure.
   ``jobworker_make_backend(plugins, config, spool_dir)`` -- once (first result wins): a
   backend instead of the local engine (with ``--live-restore`` the local engine calls
   ``jobworker_limits_restore`` once per running job it adopts); then
   ``jobworker_manager_ready(manager)`` -- once, when the job backend exists.
3. Per request: ``jobworker_rpc_started(method)``, ``jobworker_principal(identity)``
   (first result wins), then ``jobworker_authorize(identity, action, job)`` (gate), then
   ``jobworker_decision(...)`` (observer) with the outcome, and
   ``jobworker_rpc_finished(method, code, seconds)`` when it ends (a stream, when its last
   chunk was sent: ``jobworker_output_sent`` before each).
4. Per job: ``jobworker_pre_spawn`` (gate, may adjust) -> ``jobworker_limits_apply``
   (first result wins) -> ``jobworker_accounts`` and ``jobworker_networks`` (first result
   wins) -> ``jobworker_isolate`` (gate, each may adjust the plan) -> the process starts ->
   ``jobworker_job_started`` ->
   ``jobworker_output_chunk`` for every chunk -> ``jobworker_on_exit``. A start refused
   on the way (any error before the command runs) calls ``jobworker_start_refused``.
5. ``jobworker_reload()`` -- on each SIGHUP to the server, any time after step 2.
6. ``jobworker_shutdown()`` -- once, after every job was stopped.

Gate hooks veto by raising: a :class:`jobworker.errors.JobworkerError` keeps its status
code, any other exception denies with PERMISSION_DENIED and the plugin's message. Observer
hooks must not block; an exception there is logged with the plugin's name and ignored, so
it never breaks a job, its output or another plugin.

Hooks are called with keyword arguments. An implementation may take fewer arguments than
its spec; arguments are only ever added, never removed or renamed.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from jobworker.hooks import hookspec

if TYPE_CHECKING:
    from jobworker.api.identity import Identity
    from jobworker.backends.base import JobBackend
    from jobworker.backends.local.containment import Containment
    from jobworker.backends.local.isolation import IsolationPlan
    from jobworker.config import ServerConfig
    from jobworker.errors import JobworkerError
    from jobworker.hooks.host import Plugins
    from jobworker.jobspec import JobSpec, Limits
    from jobworker.model import Action, JobStatus


# -- set-up -------------------------------------------------------------------------------


@hookspec
def jobworker_add_options(parser: argparse.ArgumentParser) -> None:
    """Add the plugin's own command-line options to ``jobworker serve``.

    Called once, before arguments are parsed. Use an argument group named after the plugin
    and ``--plugin-name-*`` style option names to avoid clashes.
    """


@hookspec
def jobworker_configure(options: argparse.Namespace) -> None:
    """Read the parsed options and prepare; called once before the server starts.

    May raise :class:`jobworker.errors.ConfigError` to refuse start-up with a message.
    """


@hookspec(firstresult=True)
def jobworker_make_backend(
    plugins: Plugins, config: ServerConfig, spool_dir: Path
) -> JobBackend | Awaitable[JobBackend | None] | None:
    """Provide the server's job backend instead of the local engine (jobs on this host).

    First result wins. Called once on the server's event loop, after
    ``jobworker_configure`` and before ``jobworker_manager_ready``; may return an awaitable
    (an ``async def`` implementation). The backend calls the job life-cycle hooks
    (``pre_spawn``, ``start_refused``, ``job_started``, ``output_chunk``, ``on_exit``)
    itself. Raise :class:`jobworker.errors.ConfigError` to refuse start-up. The ``ray``
    plugin implements it (docs/cluster.md).
    """


@hookspec(firstresult=True)
def jobworker_metrics_registry() -> object | None:
    """The ``prometheus_client.CollectorRegistry`` served at ``/metrics``, or None.

    First result wins. The built-in ``metrics`` plugin answers once configured; other
    plugins should not implement this, but ``jobworker_metrics_ready``.
    """


@hookspec
def jobworker_metrics_ready(registry: object) -> None:
    """Register the plugin's own metrics on ``registry`` (a
    ``prometheus_client.CollectorRegistry``), so they appear on the server's ``/metrics``
    page. Called once after ``jobworker_configure``, only when the ``metrics`` plugin is
    loaded. Observer.

    Keep label values bounded (no job ids in counters: they never go away).
    """


@hookspec
def jobworker_manager_ready(manager: JobBackend) -> None:
    """The server's job backend (a :class:`jobworker.backends.base.JobBackend`) exists; keep it
    to act on jobs later. Observer.

    Called once, after ``jobworker_configure`` and once the server's port is bound,
    before the first request: the place for what must not happen before (the cgroupv2
    plugin takes its cgroup root and removes its leftovers here). Raise
    :class:`jobworker.errors.ConfigError` to stop the start-up. A plugin that
    stops jobs (at a deadline, say) calls ``await manager.stop(job_id, by=..., grace=...)``
    from the event loop, so the stop is recorded like any other.
    """


@hookspec
def jobworker_shutdown() -> None:
    """Release what the plugin holds; called once after every job has been stopped."""


@hookspec
def jobworker_reload() -> Callable[[], None] | None:
    """Re-read the plugin's files (the server got SIGHUP); put nothing in force yet.

    Return a callable that puts what was read in force, or None when there is nothing to
    reload. Raise :class:`jobworker.errors.ConfigError` naming the file (and line) to keep
    what is in force: the server then applies no plugin's reload and not its own, so the
    whitelist, the CRL and the certificates change together or not at all. The returned
    callables must not fail.
    """


# -- authorization ------------------------------------------------------------------------


@hookspec(firstresult=True)
def jobworker_principal(identity: Identity) -> str | None:
    """The one name ``identity`` acts as: jobs it starts are owned by it, and a user's
    own jobs are those owned by it. None: no opinion.

    First result wins; without one, ``identity.name``. The ``authz`` plugin answers with
    the first of ``identity.names`` its whitelist lists, the name that also gives the role.
    """


@hookspec
def jobworker_authorize(identity: Identity, action: Action, job: JobStatus | None) -> bool | None:
    """Allow or deny ``action`` by ``identity`` on ``job`` (None for start, list, unknown ids).

    Gate. Return True to allow, None to abstain; raise to deny (raise
    :class:`jobworker.errors.NotFound` to hide that the job exists). The request is allowed
    only if at least one plugin returned True and none raised: with no opinion, it fails
    closed.
    """


@hookspec
def jobworker_decision(
    identity: Identity, action: Action, job_id: str | None, allowed: bool, reason: str
) -> None:
    """Observe an authorization outcome (for audit). Observer."""


@hookspec
def jobworker_rpc_started(method: str) -> None:
    """An RPC of the job service (``method`` like "StartJob") arrived. Observer."""


@hookspec
def jobworker_rpc_finished(method: str, code: str, seconds: float) -> None:
    """An RPC of the job service ended with gRPC status ``code`` ("OK", "NOT_FOUND", and
    "CANCELLED" when the client went away) after ``seconds``. Observer."""


@hookspec
def jobworker_output_sent(job_id: str, nbytes: int) -> None:
    """``nbytes`` of the job's output are being sent to a StreamOutput client. Observer.

    Called on the event loop for every chunk sent: it must return quickly.
    """


# -- job life cycle -----------------------------------------------------------------------


@hookspec
def jobworker_pre_spawn(job_id: str, spec: JobSpec, owner: str) -> JobSpec | None:
    """Inspect a job before anything is created for it; veto by raising.

    Gate. Return a new :class:`JobSpec` to adjust the job (for example to cap its limits);
    the next plugin sees the adjusted spec. Return None to leave it as it is.
    """


@hookspec(firstresult=True)
def jobworker_limits_apply(job_id: str, spec: JobSpec) -> Containment | None:
    """Create the job's containment and apply its limits, before its process exists.

    First result wins. Return a :class:`jobworker.backends.local.containment.Containment`; the
    launcher
    joins it (``join_path``) before the user's command runs. Raise
    :class:`jobworker.errors.InvalidArgument` or ``FailedPrecondition`` for limits that
    cannot be enforced. Return None to leave the job to the next plugin, or, when no plugin
    answers, to the core's process-group containment.
    """


@hookspec(firstresult=True)
def jobworker_limits_restore(job_id: str, containment: str, applied: Limits) -> Containment | None:
    """Adopt the containment of a job a previous server left running (``--live-restore``).

    ``containment`` is the name the job's containment had (``Containment.name``, e.g.
    ``cgroupv2:/sys/fs/cgroup/worker_jobs/<id>``), ``applied`` its limits. Return the
    containment to go on with, or None when the name is not this plugin's. Raise
    :class:`jobworker.errors.JobworkerError` with the reason when it is this plugin's but
    cannot be adopted (it is gone, or not under this plugin's root): the job is then
    reported lost, never adopted blindly. Called before the server listens, for each
    running job the records describe; a plugin that made containments and stays loaded
    keeps those not adopted from being cleaned up until ``jobworker_manager_ready``.
    """


@hookspec(firstresult=True)
def jobworker_accounts(owner: str) -> Sequence[str] | None:
    """The Unix accounts ``owner``'s jobs may run as, its default first; None: no opinion.

    First result wins. The ``authz`` plugin answers from the whitelist's ``run_as`` lists;
    a client with none runs as the server's default (``--job-user``).
    """


@hookspec(firstresult=True)
def jobworker_networks(owner: str) -> Sequence[str] | None:
    """The job networks granted to ``owner`` beyond ``private`` and ``none`` (which every
    client may ask for): ``["host"]`` lets its jobs use the host's network. First result
    wins; None: no grant. The ``authz`` plugin answers from the whitelist's ``networks``.
    """


@hookspec
def jobworker_isolate(
    job_id: str,
    spec: JobSpec,
    owner: str,
    accounts: Sequence[str] | None,
    networks: Sequence[str] | None,
    plan: IsolationPlan | None,
) -> IsolationPlan | None:
    """Decide how the job's process is isolated: namespaces, account, filesystem view.

    ``accounts`` is what ``jobworker_accounts`` answered for the owner: the Unix accounts
    it may run jobs as, its default first (None: the server's default account only).
    ``networks`` is what ``jobworker_networks`` answered: the networks granted to it.

    Gate, chained like ``jobworker_pre_spawn``: each implementation sees the plan the one
    before returned (None before the first) and may return a replacement, usually
    ``attrs.evolve(plan, ...)`` to add hidden paths, force ``network=Network.NONE`` or
    prepend an exec ``wrapper`` (a seccomp or Landlock loader, ``aa-exec``). The launcher
    applies the final plan in the job's first process, before the command runs; see
    :mod:`jobworker.backends.local.isolation`. The built-in ``isolation`` plugin runs first
    (``tryfirst``). Raise to refuse the job (PermissionDenied for an account the client
    may not use). With no plan, the job runs with the server's own uid and namespaces.
    """


@hookspec
def jobworker_start_refused(job_id: str, spec: JobSpec, owner: str, error: JobworkerError) -> None:
    """A start was refused after authorization allowed it: bad input, a full server, a
    ``jobworker_pre_spawn`` veto, limits that cannot be enforced, or a command that cannot
    be executed. ``error`` is what the caller receives. Nothing of the job remains. Observer.
    """


@hookspec
def jobworker_job_started(status: JobStatus) -> None:
    """The job's command is running. Observer."""


@hookspec
def jobworker_output_chunk(job_id: str, stream: str, data: bytes) -> None:
    """A chunk of output (``stream`` is "stdout" or "stderr") was spooled. Observer.

    Called on the event loop for every chunk: it must return quickly and never block.
    """


@hookspec
def jobworker_on_exit(status: JobStatus) -> None:
    """The job is over and every process is gone; ``status.exit`` says how. Observer."""

"""Loading plugins by name, and the typed facade core code calls hooks through.

Core code never touches ``pm.hook``: it calls :class:`Plugins` methods, so mypy checks every
call site and the gate/observer error rules live in one place.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.metadata
import inspect
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pluggy
import structlog

from jobworker.errors import ConfigError, JobworkerError, PermissionDenied
from jobworker.hooks import PROJECT_NAME

if TYPE_CHECKING:
    from jobworker.api.identity import Identity
    from jobworker.backends.base import JobBackend
    from jobworker.backends.local.containment import Containment
    from jobworker.backends.local.isolation import IsolationPlan
    from jobworker.config import ServerConfig
    from jobworker.jobspec import JobSpec, Limits
    from jobworker.model import Action, JobStatus

log = structlog.get_logger("jobworker.plugins")

#: Built-in plugins, by the name ``--plugin`` takes, and their ``module:class``; each
#: plugin host makes its own instance, with no arguments.
BUILTIN_PLUGINS: dict[str, str] = {
    "authz": "jobworker.plugins.authz:Authz",
    "audit-log": "jobworker.plugins.auditlog:AuditLog",
    "cgroupv2": "jobworker.plugins.cgroupv2:CgroupV2Plugin",
    "isolation": "jobworker.plugins.isolation:Isolation",
    "ray": "jobworker.backends.ray.plugin:RayPlugin",
    "metrics": "jobworker.plugins.metrics:Metrics",
}
#: Loaded by every server before the plugins it is asked for: authorization and isolation
#: fail closed.
ESSENTIAL_PLUGINS: tuple[str, ...] = ("authz", "isolation")


def _description(plugin: object) -> str:
    """A plugin's one line: its ``description`` attribute, else the first line of its
    class's (or, for a module plugin, the module's) docstring."""
    text = getattr(plugin, "description", None)
    if isinstance(text, str) and text:
        return text
    doc = plugin.__doc__ if isinstance(plugin, types.ModuleType) else type(plugin).__doc__
    return (doc or "").strip().split("\n", 1)[0]


def available_plugins() -> list[str]:
    """Every name ``--plugin`` accepts: built-ins, then installed entry points."""
    names = list(BUILTIN_PLUGINS)
    for ep in importlib.metadata.entry_points(group=PROJECT_NAME):
        if ep.name not in names:
            names.append(ep.name)
    return names


def _unknown_plugin(name: str) -> str:
    """A typo of a known name gets a suggestion; any other name, how to install it."""
    known = available_plugins()
    available = f"available: {', '.join(known)}"
    if close := difflib.get_close_matches(name, known, n=1, cutoff=0.75):
        return f"unknown plugin {name!r}: did you mean {close[0]!r}? ({available})"
    return (
        f"unknown plugin {name!r}: neither built in nor installed; install the package that"
        f" provides it next to jobworker (`{sys.executable} -m pip install PACKAGE`;"
        f" plugins are usually named jobworker-{name}) ({available})"
    )


def _load_object(name: str) -> tuple[object, str | None]:
    """Import plugin ``name``; return the object to register and its distribution version."""
    if name in BUILTIN_PLUGINS:
        module, _, cls = BUILTIN_PLUGINS[name].partition(":")
        return getattr(importlib.import_module(module), cls)(), None
    matches = importlib.metadata.entry_points(group=PROJECT_NAME, name=name)
    if not matches:
        raise ConfigError(_unknown_plugin(name))
    ep = next(iter(matches))
    obj = ep.load()
    if isinstance(obj, type):  # a plugin class: one instance per server
        obj = obj()
    version = ep.dist.version if ep.dist is not None else None
    return obj, version


class Plugins:
    """The plugin manager and the typed facade over its hooks."""

    def __init__(self) -> None:
        # Here, not at the top: the specs name this class in their types, and a module-level
        # import both ways would be an import circle (tests/unit/test_import_graph.py).
        from jobworker.hooks import spec

        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(spec)
        self._versions: dict[str, str | None] = {}

    # -- loading -------------------------------------------------------------------------

    def register(self, plugin: object, name: str, version: str | None = None) -> None:
        """Register an already imported plugin (used by tests and embedders).

        Raises ``ConfigError`` for a hook wrapper: the facade calls each implementation
        itself (gates and observers have their own error rules), so a wrapper would be
        called as a plain function.
        """
        if self.pm.has_plugin(name):
            return
        self.pm.register(plugin, name=name)
        wrappers = sorted(
            caller.name
            for caller in self.pm.get_hookcallers(plugin) or []
            for impl in caller.get_hookimpls()
            if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper)
        )
        if wrappers:
            self.pm.unregister(plugin)
            raise ConfigError(
                f"plugin {name!r}: {wrappers[0]} is a hook wrapper (wrapper=True or "
                "hookwrapper=True), which jobworker does not support: implement the hook "
                "as a plain function"
            )
        self._versions[name] = version

    def load_for_server(self, names: Iterable[str]) -> None:
        """Load what ``jobworker serve`` loads: the essential plugins, then ``names``."""
        self.load([*ESSENTIAL_PLUGINS, *names])

    def check_essential(self) -> None:
        """Raise ``ConfigError`` unless some plugin authorizes requests and one isolates jobs
        (even ``--no-isolation`` is the isolation plugin's decision, logged)."""
        if not self.has_impl("jobworker_authorize"):
            raise ConfigError("no authorization plugin is loaded; load 'authz' with a whitelist")
        if not self.has_impl("jobworker_isolate"):
            raise ConfigError(
                "no isolation plugin is loaded, so jobs would run with the server's own power:"
                " load 'isolation' (to run them unisolated on purpose: --no-isolation)"
            )

    def load(self, names: Iterable[str]) -> None:
        """Load plugins by name, in order, then reject hook implementations with no spec."""
        for name in names:
            if self.pm.has_plugin(name):
                continue
            try:
                obj, version = _load_object(name)
            except JobworkerError:
                raise
            except Exception as exc:  # an import error names the plugin, not a traceback
                raise ConfigError(
                    f"plugin {name!r} failed to load: {type(exc).__name__}: {exc}"
                ) from exc
            self.register(obj, name, version)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
            raise ConfigError(f"plugin {name!r}: {exc}") from exc

    def describe(self) -> list[dict[str, Any]]:
        """Name, version and implemented hooks of every loaded plugin (``jobworker plugins``)."""
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])
            version = self._versions.get(name)
            if version is None:
                from jobworker import __version__

                version = __version__
            row: dict[str, Any] = {
                "name": name,
                "version": version,
                "description": _description(plugin),
                "hooks": hooks,
            }
            mode = getattr(plugin, "mode", None)
            if isinstance(mode, str):  # what the plugin has in effect, e.g. isolation's
                row["mode"] = mode
            rows.append(row)
        return rows

    def has_impl(self, hook_name: str) -> bool:
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())

    # -- calling helpers -----------------------------------------------------------------

    def _impls(self, hook_name: str) -> list[pluggy.HookImpl]:
        # pluggy calls the last registered first; keep that order for gates and observers.
        return list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))

    def _observe(self, hook_name: str, **kwargs: Any) -> None:
        """Call each implementation alone so one failing plugin cannot silence the others."""
        for impl in self._impls(hook_name):
            try:
                impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception:
                log.exception("plugin_hook_failed", plugin=impl.plugin_name, hook=hook_name)

    def _gate(self, impl: pluggy.HookImpl, hook_name: str, **kwargs: Any) -> Any:
        """Call one gate implementation; a foreign exception becomes PERMISSION_DENIED."""
        try:
            return impl.function(*[kwargs[a] for a in impl.argnames])
        except JobworkerError:
            raise
        except Exception as exc:
            log.warning(
                "plugin_gate_denied", plugin=impl.plugin_name, hook=hook_name, error=str(exc)
            )
            raise PermissionDenied(f"denied by plugin {impl.plugin_name!r}: {exc}") from exc

    # -- set-up --------------------------------------------------------------------------

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        self.pm.hook.jobworker_add_options(parser=parser)

    def configure(self, options: argparse.Namespace) -> None:
        try:
            self.pm.hook.jobworker_configure(options=options)
        except JobworkerError:
            raise
        except Exception as exc:
            raise ConfigError(f"plugin configuration failed: {exc}") from exc
        self.metrics_ready()

    def metrics_ready(self) -> None:
        """Hand the metrics registry, if a plugin serves one, to every plugin."""
        registry = self.pm.hook.jobworker_metrics_registry()
        if registry is not None:
            self._observe("jobworker_metrics_ready", registry=registry)

    async def make_backend(self, config: ServerConfig, spool_dir: Path) -> JobBackend | None:
        """The backend a plugin provides (the first answer wins), or None for the local
        one; an ``async def`` implementation is awaited."""
        arguments = {"plugins": self, "config": config, "spool_dir": spool_dir}
        for impl in self._impls("jobworker_make_backend"):
            try:
                result = impl.function(*[arguments[a] for a in impl.argnames])
                if inspect.isawaitable(result):
                    result = await result
            except JobworkerError:
                raise
            except Exception as exc:
                raise ConfigError(f"plugin {impl.plugin_name!r}: {exc}") from exc
            if result is not None:
                return cast("JobBackend", result)
        return None

    def implementing(self, hook_names: Iterable[str]) -> list[str]:
        """Names of the loaded plugins that implement any of ``hook_names``."""
        wanted = set(hook_names)
        return [
            name
            for name, plugin in self.pm.list_name_plugin()
            if any(c.name in wanted for c in self.pm.get_hookcallers(plugin) or [])
        ]

    def manager_ready(self, manager: JobBackend) -> None:
        """An observer, except that a plugin's ``ConfigError`` (its cgroup root held by
        another server, say) stops the start-up."""
        for impl in self._impls("jobworker_manager_ready"):
            try:
                impl.function(manager)
            except ConfigError:
                raise
            except Exception:
                log.exception(
                    "plugin_hook_failed", plugin=impl.plugin_name, hook="jobworker_manager_ready"
                )

    def reload(self) -> list[Callable[[], None]]:
        """Every plugin's reload, read but not in force; raises ``ConfigError``."""
        try:
            answers = self.pm.hook.jobworker_reload()
        except JobworkerError:
            raise
        except Exception as exc:
            raise ConfigError(f"plugin reload failed: {exc}") from exc
        return [commit for commit in answers if commit is not None]

    def shutdown(self) -> None:
        self._observe("jobworker_shutdown")

    # -- gates ---------------------------------------------------------------------------

    def principal(self, identity: Identity) -> str:
        """The name ``identity`` owns jobs by (see ``jobworker_principal``)."""
        name: str | None = self.pm.hook.jobworker_principal(identity=identity)
        return identity.name if name is None else name

    def authorize(self, identity: Identity, action: Action, job: JobStatus | None) -> None:
        """Raise unless at least one plugin allows and none denies (fail closed)."""
        allowed = False
        for impl in self._impls("jobworker_authorize"):
            answer = self._gate(
                impl, "jobworker_authorize", identity=identity, action=action, job=job
            )
            allowed = allowed or answer is True
        if not allowed:
            raise PermissionDenied(
                f"{identity.name!r} is not authorized to {action.value}"
                " (no authorization plugin allowed it)"
            )

    def pre_spawn(self, job_id: str, spec: JobSpec, owner: str) -> JobSpec:
        for impl in self._impls("jobworker_pre_spawn"):
            result = self._gate(impl, "jobworker_pre_spawn", job_id=job_id, spec=spec, owner=owner)
            if result is not None:
                spec = result
        return spec

    def isolate(self, job_id: str, spec: JobSpec, owner: str) -> IsolationPlan | None:
        grants = {
            "accounts": self.pm.hook.jobworker_accounts(owner=owner),
            "networks": self.pm.hook.jobworker_networks(owner=owner),
        }
        plan: IsolationPlan | None = None
        for impl in self._impls("jobworker_isolate"):
            kwargs = {"job_id": job_id, "spec": spec, "owner": owner, "plan": plan}
            result = self._gate(impl, "jobworker_isolate", **grants, **kwargs)
            if result is not None:
                plan = result
        return plan

    def limits_apply(self, job_id: str, spec: JobSpec) -> Containment | None:
        for impl in self._impls("jobworker_limits_apply"):
            result = self._gate(impl, "jobworker_limits_apply", job_id=job_id, spec=spec)
            if result is not None:
                return result  # type: ignore[no-any-return]
        return None

    def limits_restore(self, job_id: str, containment: str, applied: Limits) -> Containment | None:
        for impl in self._impls("jobworker_limits_restore"):
            kwargs = {"job_id": job_id, "containment": containment, "applied": applied}
            result = self._gate(impl, "jobworker_limits_restore", **kwargs)
            if result is not None:
                return result  # type: ignore[no-any-return]
        return None

    # -- observers -----------------------------------------------------------------------

    def decision(
        self,
        identity: Identity,
        action: Action,
        job_id: str | None,
        allowed: bool,
        reason: str,
    ) -> None:
        self._observe(
            "jobworker_decision",
            identity=identity,
            action=action,
            job_id=job_id,
            allowed=allowed,
            reason=reason,
        )

    def rpc_started(self, method: str) -> None:
        self._observe("jobworker_rpc_started", method=method)

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        self._observe("jobworker_rpc_finished", method=method, code=code, seconds=seconds)

    def output_sent(self, job_id: str, nbytes: int) -> None:
        self._observe("jobworker_output_sent", job_id=job_id, nbytes=nbytes)

    def start_refused(self, job_id: str, spec: JobSpec, owner: str, error: JobworkerError) -> None:
        self._observe("jobworker_start_refused", job_id=job_id, spec=spec, owner=owner, error=error)

    def job_started(self, status: JobStatus) -> None:
        self._observe("jobworker_job_started", status=status)

    def output_chunk(self, job_id: str, stream: str, data: bytes) -> None:
        self._observe("jobworker_output_chunk", job_id=job_id, stream=stream, data=data)

    def on_exit(self, status: JobStatus) -> None:
        self._observe("jobworker_on_exit", status=status)


def load_plugins(names: Sequence[str]) -> Plugins:
    """A :class:`Plugins` with ``names`` loaded (see :meth:`Plugins.load`)."""
    plugins = Plugins()
    plugins.load(names)
    return plugins

"""Plugin loading and the gate/observer rules of the typed facade."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobworker import hookimpl
from jobworker.api.identity import Identity
from jobworker.errors import ConfigError, NotFound, PermissionDenied
from jobworker.hooks.host import (
    BUILTIN_PLUGINS,
    ESSENTIAL_PLUGINS,
    Plugins,
    available_plugins,
    load_plugins,
)
from jobworker.jobspec import JobSpec
from jobworker.model import Action


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A distribution 'jw-fake' 1.2.3 on sys.path, found through importlib.metadata."""
    dist = tmp_path / "jw_fake-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jw-fake\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(
        "[jobworker]\nfake = jw_fake_plugin\nbroken = jw_fake_broken\nmisspelled = jw_fake_typo\n"
    )
    (tmp_path / "jw_fake_plugin.py").write_text(
        "from jobworker import hookimpl\n@hookimpl\ndef jobworker_on_exit(status):\n    pass\n"
    )
    (tmp_path / "jw_fake_broken.py").write_text("raise ImportError('needs libfoo')\n")
    (tmp_path / "jw_fake_typo.py").write_text(
        "from jobworker import hookimpl\n@hookimpl\ndef jobworker_on_exitt(status):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("jw_fake_plugin", "jw_fake_broken", "jw_fake_typo"):
        sys.modules.pop(name, None)


def test_builtin_by_name() -> None:
    plugins = load_plugins(["cgroupv2"])
    rows = {row["name"]: row for row in plugins.describe()}
    assert "jobworker_limits_apply" in rows["cgroupv2"]["hooks"]
    assert set(BUILTIN_PLUGINS) <= set(available_plugins())


def test_entry_point_by_name(fake_distribution: Path) -> None:
    plugins = load_plugins(["fake"])
    assert plugins.describe() == [
        {"name": "fake", "version": "1.2.3", "description": "", "hooks": ["jobworker_on_exit"]}
    ]
    assert "fake" in available_plugins()


def test_unknown_name_lists_available(fake_distribution: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown plugin 'nope': .*available: .*cgroupv2.*fake"):
        load_plugins(["nope"])


def test_a_typo_of_a_known_name_gets_a_suggestion(fake_distribution: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown plugin 'cgroupv': did you mean 'cgroupv2'\?"):
        load_plugins(["cgroupv"])
    with pytest.raises(ConfigError, match=r"unknown plugin 'fak': did you mean 'fake'\?"):
        load_plugins(["fak"])


def test_import_failure_names_the_plugin(fake_distribution: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"plugin 'broken' failed to load: ImportError: needs libfoo"
    ):
        load_plugins(["broken"])


def test_misspelled_hook_is_a_startup_error(fake_distribution: Path) -> None:
    with pytest.raises(ConfigError, match="jobworker_on_exitt"):
        load_plugins(["misspelled"])


ALICE = Identity(common_name="alice", sans=())


class Allow:
    @hookimpl
    def jobworker_authorize(self) -> bool:
        return True


class Hide:
    @hookimpl
    def jobworker_authorize(self) -> bool:
        raise NotFound("job 'x' not found")


class Crash:
    @hookimpl
    def jobworker_authorize(self) -> bool:
        raise ValueError("policy file unreadable")


def test_authorize_fails_closed_without_an_opinion() -> None:
    with pytest.raises(PermissionDenied, match="not authorized"):
        Plugins().authorize(ALICE, Action.LIST, None)


def test_authorize_needs_one_allow_and_no_denial() -> None:
    plugins = Plugins()
    plugins.register(Allow(), "allow")
    plugins.authorize(ALICE, Action.LIST, None)
    plugins.register(Hide(), "hide")
    with pytest.raises(NotFound):
        plugins.authorize(ALICE, Action.STATUS, None)


def test_gate_that_crashes_denies_with_its_message() -> None:
    plugins = Plugins()
    plugins.register(Allow(), "allow")
    plugins.register(Crash(), "crash")
    with pytest.raises(PermissionDenied, match="denied by plugin 'crash': policy file unreadable"):
        plugins.authorize(ALICE, Action.START, None)


class Adjust:
    @hookimpl
    def jobworker_pre_spawn(self, spec: JobSpec) -> JobSpec:
        return JobSpec(spec.command, (*spec.args, "--adjusted"))


def test_pre_spawn_adjustments_chain() -> None:
    plugins = Plugins()
    plugins.register(Adjust(), "a1")
    plugins.register(Adjust(), "a2")
    spec = plugins.pre_spawn("id", JobSpec("echo"), "alice")
    assert spec.args == ("--adjusted", "--adjusted")


def test_observer_failure_does_not_silence_others(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    class Bad:
        @hookimpl
        def jobworker_output_chunk(self) -> None:
            raise RuntimeError("bug")

    class Good:
        @hookimpl
        def jobworker_output_chunk(self, stream: str) -> None:
            seen.append(stream)

    plugins = Plugins()
    plugins.register(Good(), "good")
    plugins.register(Bad(), "bad")
    plugins.output_chunk("id", "stdout", b"x")
    assert seen == ["stdout"]


class NewStyleWrapper:
    @hookimpl(wrapper=True)
    def jobworker_on_exit(self) -> Iterator[None]:
        return (yield)


class OldStyleWrapper:
    @hookimpl(hookwrapper=True)
    def jobworker_pre_spawn(self) -> Iterator[None]:
        yield


@pytest.mark.parametrize(
    ("plugin", "hook"),
    [(NewStyleWrapper(), "jobworker_on_exit"), (OldStyleWrapper(), "jobworker_pre_spawn")],
)
def test_hook_wrappers_are_refused_at_load_naming_plugin_and_hook(
    plugin: object, hook: str
) -> None:
    plugins = Plugins()
    with pytest.raises(ConfigError, match=rf"plugin 'wrapping': {hook} is a hook wrapper"):
        plugins.register(plugin, "wrapping")
    assert not plugins.pm.has_plugin("wrapping")  # nothing half-registered


def test_wrapper_in_an_entry_point_is_a_startup_error(fake_distribution: Path) -> None:
    (fake_distribution / "jw_fake_wrapper.py").write_text(
        "from jobworker import hookimpl\n"
        "@hookimpl(wrapper=True)\n"
        "def jobworker_job_started(status):\n"
        "    return (yield)\n"
    )
    with (fake_distribution / "jw_fake-1.2.3.dist-info" / "entry_points.txt").open("a") as f:
        f.write("wrapping = jw_fake_wrapper\n")
    try:
        with pytest.raises(
            ConfigError, match="'wrapping': jobworker_job_started is a hook wrapper"
        ):
            load_plugins(["wrapping"])
    finally:
        sys.modules.pop("jw_fake_wrapper", None)


def test_each_host_has_its_own_builtin_plugin_instances(tmp_path: Path) -> None:
    """Two plugin hosts in one process share nothing (no module-level state)."""
    whitelists = {}
    for name, role in (("alice", "user"), ("bob", "admin")):
        whitelists[name] = tmp_path / f"{name}.toml"
        whitelists[name].write_text(f'[[clients]]\nidentity = "{name}"\nrole = "{role}"\n')
    hosts = {}
    for name, path in whitelists.items():
        hosts[name] = Plugins()
        hosts[name].load_for_server(["audit-log"])
        hosts[name].configure(argparse.Namespace(authz=str(path), audit_log=None))
    for kind in ("authz", "audit-log"):
        assert hosts["alice"].pm.get_plugin(kind) is not hosts["bob"].pm.get_plugin(kind)
    cgroups = [load_plugins(["cgroupv2"]).pm.get_plugin("cgroupv2") for _ in range(2)]
    assert cgroups[0] is not cgroups[1]  # not configured: that would touch the host's cgroups
    hosts["alice"].authorize(ALICE, Action.LIST, None)
    with pytest.raises(PermissionDenied, match="alice is not on the authorization whitelist"):
        hosts["bob"].authorize(ALICE, Action.LIST, None)


def test_the_essential_plugins_are_loaded_for_a_server() -> None:
    plugins = Plugins()
    with pytest.raises(ConfigError, match="no authorization plugin is loaded"):
        plugins.check_essential()
    plugins.load_for_server([])
    assert [row["name"] for row in plugins.describe()] == list(ESSENTIAL_PLUGINS)
    plugins.check_essential()


def test_an_unconfigured_authz_denies() -> None:
    plugins = load_plugins(["authz"])
    with pytest.raises(PermissionDenied, match="whitelist is not loaded"):
        plugins.authorize(ALICE, Action.LIST, None)


def test_a_plugin_without_description_is_described_by_its_docstring() -> None:
    class Quiet:
        """Says nothing more.

        Not this line."""

        @hookimpl
        def jobworker_shutdown(self) -> None:
            pass

    plugins = Plugins()
    plugins.register(Quiet(), name="quiet")
    (row,) = plugins.describe()
    assert row["description"] == "Says nothing more."

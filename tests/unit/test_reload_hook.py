"""``jobworker_reload`` and ``jobworker_principal`` through the plugin host, no server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from jobworker import hookimpl
from jobworker.api.identity import Identity
from jobworker.errors import ConfigError
from jobworker.hooks.host import Plugins
from jobworker.plugins.authz import Authz, Role


def _whitelist(path: Path, *entries: tuple[str, str]) -> Path:
    path.write_text("".join(f'[[clients]]\nidentity = "{n}"\nrole = "{r}"\n' for n, r in entries))
    return path


class Failing:
    @hookimpl
    def jobworker_reload(self) -> Callable[[], None]:
        raise ValueError("limits.toml line 3: bad value")


def test_a_failed_reload_keeps_the_whitelist(tmp_path: Path) -> None:
    path = _whitelist(tmp_path / "authz.toml", ("alice", "user"))
    authz = Authz.from_file(path)
    plugins = Plugins()
    plugins.register(authz, name="authz")
    path.write_text('[[clients]]\nidentity = "alice"\nrole = \n')
    with pytest.raises(ConfigError, match=r"authz.toml is not valid TOML: .*line 3"):
        plugins.reload()
    assert authz.role_of(Identity("alice")) is Role.USER
    _whitelist(path, ("alice", "admin"))
    commits = plugins.reload()
    assert authz.role_of(Identity("alice")) is Role.USER  # read, not yet in force
    for commit in commits:
        commit()
    assert authz.role_of(Identity("alice")) is Role.ADMIN


def test_a_plugin_failing_to_reload_is_a_config_error(tmp_path: Path) -> None:
    plugins = Plugins()
    plugins.register(Failing(), name="failing")
    with pytest.raises(ConfigError, match=r"plugin reload failed: limits\.toml line 3"):
        plugins.reload()


def test_the_principal_is_the_first_listed_name(tmp_path: Path) -> None:
    plugins = Plugins()
    whitelist = _whitelist(tmp_path / "authz.toml", ("bob", "user"), ("ops", "admin"))
    plugins.register(Authz.from_file(whitelist), name="authz")
    assert plugins.principal(Identity("mallory", sans=("ops", "bob"))) == "ops"
    assert plugins.principal(Identity("bob", sans=("ops",))) == "bob"
    assert plugins.principal(Identity("mallory")) == "mallory"  # unlisted: its own name

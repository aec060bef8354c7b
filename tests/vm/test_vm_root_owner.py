"""A cgroup root belongs to one server, on a pure cgroup v2 kernel (controllers enabled):
the scenarios of tests/integration/test_cgroup_root_owner.py, run inside the test VM
(tests/vm/run_vm.py) with real ``jobworker serve --plugin cgroupv2`` processes."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobworker.api.pki import PkiPaths
from tests.integration.test_cgroup_hybrid import _force_remove
from tests.integration.test_cgroup_root_owner import (
    test_a_second_server_on_a_held_root_refuses_to_start_and_touches_nothing,
    test_two_servers_on_nested_roots_keep_each_others_jobs,
)
from tests.serverfixtures import make_api_pki

CGROUP_FS = Path("/sys/fs/cgroup")


def _pure_v2() -> bool:
    controllers = CGROUP_FS / "cgroup.controllers"
    return controllers.exists() and {"cpu", "memory", "pids"} <= set(
        controllers.read_text().split()
    )


pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(not _pure_v2(), reason="needs a pure cgroup v2 host: run in the VM"),
]

__all__ = [
    "test_a_second_server_on_a_held_root_refuses_to_start_and_touches_nothing",
    "test_two_servers_on_nested_roots_keep_each_others_jobs",
]


@pytest.fixture(autouse=True)
def loopback() -> None:
    """The VM boots with its loopback down; the servers listen on 127.0.0.1."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


@pytest.fixture
def root() -> Iterator[Path]:
    path = CGROUP_FS / f"jobworker-owner-{secrets.token_hex(4)}"
    try:
        yield path
    finally:
        _force_remove(path)


@pytest.fixture
def api_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return make_api_pki(tmp_path_factory.mktemp("api-pki"))

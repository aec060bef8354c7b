"""The backend seam: the default engine implements the protocol the edges depend on."""

from __future__ import annotations

import inspect
from pathlib import Path

from jobworker.api.server import local_backend
from jobworker.backends.base import JobBackend
from jobworker.backends.local.manager import JobManager
from jobworker.hooks.host import Plugins


def protocol_methods() -> set[str]:
    return {name for name in vars(JobBackend) if not name.startswith("_")}


def test_job_manager_implements_every_method_with_the_same_signature() -> None:
    assert protocol_methods() >= {"start", "stop", "get", "find", "list", "follow", "wait"}
    for name in protocol_methods():
        wanted = inspect.signature(getattr(JobBackend, name))
        found = inspect.signature(getattr(JobManager, name))
        assert list(found.parameters) == list(wanted.parameters), name
        assert inspect.iscoroutinefunction(getattr(JobManager, name)) == (
            inspect.iscoroutinefunction(getattr(JobBackend, name))
        ), name


def test_protocol_names_no_local_detail() -> None:
    source = inspect.getsource(JobBackend)
    assert "pid" not in source


def test_local_backend_is_a_job_manager(tmp_path: Path) -> None:
    from jobworker.api.tlsfiles import TlsFiles
    from jobworker.config import ServerConfig

    config = ServerConfig(tls=TlsFiles("c", "k", "a"))
    backend: JobBackend = local_backend(config, Plugins(), tmp_path)
    assert isinstance(backend, JobManager)

"""Shared set-up for integration tests.

jobworker.api.tls sets GRPC_SSL_CIPHER_SUITES before it imports grpc, and grpc reads it only
when first imported: importing it here, before any test module imports grpc, makes the
servers of this test process refuse TLS 1.2 as a production server does.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

import jobworker.api.tls  # noqa: F401
from jobworker.api.pki import PkiPaths
from tests.serverfixtures import RunningServer, make_api_pki, running_server


@pytest.fixture(scope="session")
def api_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    """CA, server and clients alice, bob (users), root (admin), mallory (not whitelisted)."""
    return make_api_pki(tmp_path_factory.mktemp("api-pki"))


@pytest.fixture(scope="session")
def api_server(api_pki: PkiPaths) -> Iterator[RunningServer]:
    """One jobworker server shared by the API tests: tests only touch jobs they start."""
    with running_server(api_pki) as server:
        yield server


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"

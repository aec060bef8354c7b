"""Test-wide set-up.

``jobworker.api.grpcenv`` imports grpc with TLS 1.2 refused; importing it here, before any test
module imports grpc, gives every server started by the test process the production
handshake policy.
"""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import jobworker.api.grpcenv  # noqa: F401
from tests.jobpaths import JOB_VISIBLE_ROOT


@pytest.fixture
def job_tmp_path() -> Iterator[Path]:
    """A fresh directory that jobs of the tests' servers can read and write (mode 0777)."""
    JOB_VISIBLE_ROOT.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(dir=JOB_VISIBLE_ROOT))
    directory.chmod(0o777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)

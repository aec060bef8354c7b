"""What a plugin author imports stays light: no grpc, no cryptography, no environment edit."""

from __future__ import annotations

import subprocess
import sys

import pytest

PLUGIN_AUTHOR_IMPORTS = """
import os, sys
before = dict(os.environ)
import jobworker
from jobworker import hookimpl
import jobworker.errors, jobworker.model, jobworker.hooks.spec, jobworker.hooks.host
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "cryptography"))
print(heavy)
assert dict(os.environ) == before, "importing jobworker changed the environment"
"""


def test_import_jobworker_loads_neither_grpc_nor_cryptography() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PLUGIN_AUTHOR_IMPORTS],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module", ["jobworker.api.tls", "jobworker.client", "jobworker.api.server"]
)
def test_modules_using_grpc_import_it_through_grpcenv(module: str) -> None:
    code = f"import sys, {module}; assert 'jobworker.api.grpcenv' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

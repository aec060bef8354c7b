"""Wire compatibility: a client generated from the original API definition still works.

The client runs in its own process with only its own generated code (see
original_proto/), so nothing of the current proto can leak into it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from grpc_tools import protoc

from jobworker.api.pki import PkiPaths
from tests.serverfixtures import RunningServer

ORIGINAL = Path(__file__).parent / "original_proto"
PROTO = "jobworker_original.proto"


def generate_original_client(out: Path) -> Path:
    out.mkdir()
    rc = protoc.main(
        ["protoc", f"-I{ORIGINAL}", f"--python_out={out}", f"--grpc_python_out={out}", PROTO]
    )
    assert rc == 0, "grpc_tools.protoc failed on the original proto"
    return out


def test_original_client_end_to_end(
    api_server: RunningServer, api_pki: PkiPaths, tmp_path: Path
) -> None:
    generated = generate_original_client(tmp_path / "generated")
    files = api_pki.client("alice")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    result = subprocess.run(
        [
            sys.executable,
            str(ORIGINAL / "original_client.py"),
            str(generated),
            api_server.address,
            str(files.cert),
            str(files.key),
            str(files.ca),
        ],
        env=env,
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    seen = json.loads(result.stdout)

    assert seen["chunks"] == [["stdout", "hello\n"], ["stderr", "oops\n"]]
    assert seen["status"] == [seen["job_id"], "exited", 7]
    success, message = seen["stop_finished"]
    assert success
    assert message == "job already finished (exited with exit code 7)"
    assert seen["running"] == "running"
    assert seen["stop_running"][0] is True
    # Killed by SIGTERM: the original client, which knows only exit_code, sees 128+15.
    assert seen["stopped"] == ["exited", 128 + signal.SIGTERM]

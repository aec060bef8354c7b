"""A JSON log stays JSON lines when native code writes plain text to the same stderr
(Ray's C++ core does, in a front server): every line of the process's stderr is a JSON
record, in order, nothing dropped, the last partial line included."""

from __future__ import annotations

import json
import subprocess
import sys

#: A process that logs as ``serve`` does and has other writers on its file descriptor 2.
SCRIPT = r"""
import os, threading
import structlog
from jobworker.logconfig import configure_logging, keep_stderr_json
configure_logging("info", json=True)
keep_stderr_json("ray_core_log")
log = structlog.get_logger("t")
log.info("before")
os.write(2, b"[2026-12-06 06:03:41,950 E 9387 9425] rpc_client.h:204: Failed to connect\n")
writer = threading.Thread(target=lambda: [os.write(2, b"plain %d\n" % i) for i in range(2000)])
writer.start()
writer.join()
log.info("last", quote='"{not json')
os.write(2, b"{a partial line, at exit")
"""


def test_every_line_on_stderr_is_a_json_record_and_none_is_lost() -> None:
    ran = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, timeout=60)
    assert ran.returncode == 0, ran.stderr[-2000:]
    records = [json.loads(line) for line in ran.stderr.decode().splitlines()]
    events = [r["event"] for r in records]
    assert events == ["before", *["ray_core_log"] * 2001, "last", "ray_core_log"]
    native = records[1]
    assert (native["level"], native["message"]) == (
        "error",
        "[2026-12-06 06:03:41,950 E 9387 9425] rpc_client.h:204: Failed to connect",
    )
    assert [r["message"] for r in records[2:2002]] == [f"plain {i}" for i in range(2000)]
    assert records[2]["level"] == "warning"
    assert records[-2]["quote"] == '"{not json'
    assert records[-1]["message"] == "{a partial line, at exit"

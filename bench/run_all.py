"""Run every benchmark in turn; arguments (e.g. ``--quick``) are passed to each."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = [
    "bench_start.py",
    "bench_stream.py",
    "bench_impact.py",
    "bench_memory.py",
    "bench_scale.py",
    "bench_spawn.py",
    "bench_metrics.py",
    "bench_stalled.py",
    "bench_spool_stall.py",
    "bench_flood.py",
    "bench_connections.py",
    "bench_restore.py",
    "bench_ssh.py",
    "bench_client.py",
    "bench_stdin.py",
]


def main() -> int:
    here = Path(__file__).resolve().parent
    failed = []
    for name in BENCHMARKS:
        if not (here / name).exists():
            continue
        began = time.monotonic()
        status = subprocess.call([sys.executable, str(here / name), *sys.argv[1:]], cwd=here)
        print(f"   ({name}: {time.monotonic() - began:.0f} s)\n", flush=True)
        if status:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

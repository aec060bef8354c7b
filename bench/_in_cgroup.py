"""Run a server script (argv[1]) inside the cgroup v2 directory ``$JOBWORKER_BENCH_CGROUP``:
it moves itself there first, so every thread and child starts in that cgroup."""

from __future__ import annotations

import os
import runpy
import sys

with open(os.path.join(os.environ["JOBWORKER_BENCH_CGROUP"], "cgroup.procs"), "w") as procs:
    procs.write("0")
script = sys.argv.pop(1)
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")

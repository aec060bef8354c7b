"""Run a server script (argv[1]) with every ``pwritev``/``pwrite`` of the process taking
``JOBWORKER_SLOW_WRITE_MS`` longer, as on a throttled disk.

The delay is a blocking sleep inside the call, which releases the GIL exactly as a write
the kernel holds in ``balance_dirty_pages`` does: what is measured is who waits for it.
"""

from __future__ import annotations

import os
import runpy
import sys
import time

DELAY = float(os.environ.get("JOBWORKER_SLOW_WRITE_MS", "50")) / 1000


def _slow(call):  # type: ignore[no-untyped-def]
    def slowed(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(DELAY)
        return call(*args, **kwargs)

    return slowed


os.pwritev = _slow(os.pwritev)
os.pwrite = _slow(os.pwrite)
script = sys.argv.pop(1)
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")

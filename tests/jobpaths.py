"""Where tests put files a job must read or write.

Not /tmp: every isolated job gets a private /tmp. The servers the tests start make this
directory writable for their jobs (``--isolation-writable``).
"""

import os
from pathlib import Path

JOB_VISIBLE_ROOT = (
    Path("/var/lib/jobworker-tests")
    if os.geteuid() == 0
    else Path.home() / ".cache" / "jobworker-tests"
)

"""A command's round trip, client start-up included: ``jobworker run -- true`` against
``python -c "import grpc"`` (the floor any grpc client pays) and ``ssh host true``.

* jobworker: the installed ``jobworker run -- true`` against ``_server.py`` on 127.0.0.1,
  with its TLS files from the ``JOBWORKER_*`` variables;
* grpc: ``python -c "import grpc"``, and ``python -c pass`` (the interpreter alone);
* ssh: ``ssh -p PORT 127.0.0.1 true`` against the throw-away sshd of bench_ssh.py (ed25519
  keys, loopback; the system's sshd is never touched).

Runs alternate, one of each per round; medians, and the ratios the client is held to
(docs/performance.md, "The client's start-up"). ``--baseline-src DIR`` (a checkout of an
older version) adds that version's client (``python -m jobworker`` with it on PYTHONPATH)
against the same server, beside this version's run the same way.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    CLIENT,
    add_baseline_option,
    header,
    jobworker_server,
    make_pki,
    ms,
    parser,
    row,
    workdir,
)
from bench_ssh import start_sshd

#: What the client is held to (issue 21): at most this many times ``import grpc`` ...
MAX_RATIO_TO_GRPC = 1.8
#: ... and under this share of ``ssh host true``.
MAX_RATIO_TO_SSH = 0.5


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds until ``command`` exited; it must succeed."""
    began = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=40)
    add_baseline_option(p)
    options = p.parse_args()
    rounds = 15 if options.quick else options.rounds
    header(f"a command's round trip: {rounds} rounds, each command once per round")
    jobworker = str(Path(sys.executable).with_name("jobworker"))
    with workdir() as work:
        pki = make_pki(work / "pki")
        files = pki.client(CLIENT)
        sshd, ssh = start_sshd(work)
        try:
            with jobworker_server(pki, work, retain=2) as server:
                env = {
                    **os.environ,
                    "JOBWORKER_SERVER": server.address,
                    "JOBWORKER_TLS_CERT": str(files.cert),
                    "JOBWORKER_TLS_KEY": str(files.key),
                    "JOBWORKER_TLS_CA": str(files.ca),
                }
                as_module = [sys.executable, "-m", "jobworker", "run", "--", "true"]
                commands: dict[str, tuple[list[str], dict[str, str] | None]] = {
                    "python -c pass": ([sys.executable, "-c", "pass"], None),
                    'python -c "import grpc"': ([sys.executable, "-c", "import grpc"], None),
                    "jobworker run -- true": ([jobworker, "run", "--", "true"], env),
                    "ssh 127.0.0.1 true": ([*ssh, "true"], None),
                }
                if options.baseline_src is not None:
                    old = {**env, "PYTHONPATH": str(options.baseline_src)}
                    commands["python -m jobworker run -- true"] = (as_module, env)
                    commands[f"  the same, baseline {options.baseline_src.name}"] = (as_module, old)
                for command, command_env in commands.values():  # warm the page cache
                    timed(command, command_env)
                runs: dict[str, list[float]] = {label: [] for label in commands}
                for _ in range(rounds):
                    for label, (command, command_env) in commands.items():
                        runs[label].append(timed(command, command_env))
        finally:
            sshd.terminate()
            sshd.wait()
    median = {label: statistics.median(samples) for label, samples in runs.items()}
    for label, value in median.items():
        row(label, f"median {ms(value)}", f"min {ms(min(runs[label]))}")
    run, grpc, ssh_ = (
        median["jobworker run -- true"],
        median['python -c "import grpc"'],
        median["ssh 127.0.0.1 true"],
    )
    row(f"ratio run / import grpc (target <= {MAX_RATIO_TO_GRPC})", f"{run / grpc:.2f}")
    row(f"ratio run / ssh (target < {MAX_RATIO_TO_SSH})", f"{run / ssh_:.2f}")
    if options.baseline_src is not None:
        new = median["python -m jobworker run -- true"]
        old = median[f"  the same, baseline {options.baseline_src.name}"]
        row("ratio baseline / this version (python -m)", f"{old / new:.2f}")


if __name__ == "__main__":
    main()

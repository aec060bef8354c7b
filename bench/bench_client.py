"""A command's round trip, client start-up included: ``jobworker run -- true`` against
``python -c "import grpc"`` (the floor any grpc client pays) and ``ssh host true``.

* jobworker: the installed ``jobworker run -- true`` against ``_server.py`` on 127.0.0.1,
  with its TLS files from the ``JOBWORKER_*`` variables;
* grpc: ``python -c "import grpc"``, and ``python -c pass`` (the interpreter alone);
* ssh: ``ssh -p PORT 127.0.0.1 true`` against the throw-away sshd of bench_ssh.py (ed25519
  keys, loopback; the system's sshd is never touched).

Every version's package is byte-compiled first (``compileall``, as ``pip install`` does): a
checkout run with ``PYTHONDONTWRITEBYTECODE`` set would otherwise compile its modules anew
in every run, which a user's installed client never does. Runs alternate, one of each per
round; medians of the wall time, and of the CPU time the
command used (user and system: what the client itself costs, less disturbed by other load
on the machine), and the ratios the client is held to (docs/performance.md, "The
client's start-up"). ssh's CPU is its client's alone. ``--baseline-src DIR`` (a checkout of an
older version) adds that version's client (``python -m jobworker`` with it on PYTHONPATH)
against the same server, beside this version's run the same way.
"""

from __future__ import annotations

import compileall
import os
import resource
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

import jobworker

#: What the client is held to (issue 21): at most this many times ``import grpc`` ...
MAX_RATIO_TO_GRPC = 1.8
#: ... and under this share of ``ssh host true``.
MAX_RATIO_TO_SSH = 0.5


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Seconds until ``command`` exited, and the CPU seconds it used (user and system,
    less disturbed by the machine's other load); it must succeed. Its stdin is /dev/null,
    which ``run`` leaves alone as it does a terminal (from a pipe it would forward it)."""
    cpu, began = _children_cpu(), time.perf_counter()
    subprocess.run(
        command, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - began, _children_cpu() - cpu


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=40)
    add_baseline_option(p)
    options = p.parse_args()
    rounds = 15 if options.quick else options.rounds
    header(f"a command's round trip: {rounds} rounds, each command once per round")
    program = str(Path(sys.executable).with_name("jobworker"))
    sources = [Path(jobworker.__file__).parent]
    if options.baseline_src is not None:
        sources.append(options.baseline_src / "jobworker")
    for package in sources:
        compileall.compile_dir(package, quiet=1)
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
                    "jobworker run -- true": ([program, "run", "--", "true"], env),
                    # The same client, a job with no network to set up (no pasta): what is
                    # left of the round trip once a private network's start is taken out.
                    "jobworker run --network none -- true": (
                        [program, "run", "--network", "none", "--", "true"],
                        env,
                    ),
                    "ssh 127.0.0.1 true": ([*ssh, "true"], None),
                }
                if options.baseline_src is not None:
                    old = {**env, "PYTHONPATH": str(options.baseline_src)}
                    commands["python -m jobworker run -- true"] = (as_module, env)
                    commands[f"  the same, baseline {options.baseline_src.name}"] = (as_module, old)
                for command, command_env in commands.values():  # warm the page cache
                    timed(command, command_env)
                runs: dict[str, list[tuple[float, float]]] = {label: [] for label in commands}
                for _ in range(rounds):
                    for label, (command, command_env) in commands.items():
                        runs[label].append(timed(command, command_env))
        finally:
            sshd.terminate()
            sshd.wait()
    wall = {label: statistics.median(w for w, _ in samples) for label, samples in runs.items()}
    cpu = {label: statistics.median(c for _, c in samples) for label, samples in runs.items()}
    for label, samples in runs.items():
        row(
            label,
            f"median {ms(wall[label])}",
            f"min {ms(min(w for w, _ in samples))}",
            f"CPU median {ms(cpu[label])}",
        )
    run, grpc, ssh_ = "jobworker run -- true", 'python -c "import grpc"', "ssh 127.0.0.1 true"
    for name, figures in (("wall", wall), ("CPU", cpu)):
        row(
            f"{name}: run / import grpc (target <= {MAX_RATIO_TO_GRPC})",
            f"{figures[run] / figures[grpc]:.2f}",
        )
    row(f"wall: run / ssh (target < {MAX_RATIO_TO_SSH})", f"{wall[run] / wall[ssh_]:.2f}")
    bare = "jobworker run --network none -- true"
    row("wall: run --network none / import grpc", f"{wall[bare] / wall[grpc]:.2f}")
    row("wall: run --network none / ssh", f"{wall[bare] / wall[ssh_]:.2f}")
    if options.baseline_src is not None:
        new = wall["python -m jobworker run -- true"]
        old = wall[f"  the same, baseline {options.baseline_src.name}"]
        row("wall: baseline / this version (python -m)", f"{old / new:.2f}")


if __name__ == "__main__":
    main()

"""What a user compares jobworker with: ``ssh host cmd``, both through their command-line
clients into ``wc -c``.

* ssh: a throw-away ``sshd`` on a free 127.0.0.1 port with generated ed25519 host and user
  keys (installed with apt-get if missing; the system's sshd and its config are never
  touched), ``ssh -p PORT 127.0.0.1 head -c SIZE /dev/zero | wc -c``;
* jobworker: ``jobworker run -- head -c SIZE /dev/zero | wc -c`` against ``_server.py``.

Runs alternate; MB/s is SIZE over the wall time of the whole pipeline, client start-up
included for both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    CLIENT,
    MB,
    GiB,
    ServerProcess,
    add_baseline_option,
    header,
    jobworker_server,
    make_pki,
    parser,
    row,
    workdir,
)


def _sshd_binary() -> str:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if found is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server"], check=True)
        found = "/usr/sbin/sshd"
    return found


def start_sshd(work: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    """A private sshd for the current user; returns it and the ssh command prefix."""
    d = work / "ssh"
    d.mkdir()
    for name in ("host", "user"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
        )
    shutil.copy(d / "user.pub", d / "authorized_keys")
    port = free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
        f"PidFile {d / 'sshd.pid'}\nStrictModes no\nUsePAM no\nPermitRootLogin yes\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen(
        [_sshd_binary(), "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL
    )
    ssh = [
        "ssh", "-q", "-p", str(port), "-i", str(d / "user"),
        "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={d / 'known_hosts'}",
        "-o", "BatchMode=yes", "127.0.0.1",
    ]  # fmt: skip
    deadline = time.monotonic() + 10
    while subprocess.run([*ssh, "true"], check=False).returncode != 0:
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the throw-away sshd did not start")
        time.sleep(0.2)
    return proc, ssh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def timed(command: list[str], size: int, env: dict[str, str] | None = None) -> float:
    """MB/s of ``command | wc -c``; checks the count."""
    began = time.monotonic()
    producer = subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
    counted = subprocess.run(["wc", "-c"], stdin=producer.stdout, capture_output=True, check=True)
    assert producer.stdout is not None
    producer.stdout.close()
    producer.wait()
    seconds = time.monotonic() - began
    assert int(counted.stdout) == size, (command, counted.stdout)
    return size / seconds / MB


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--size", type=float, default=1.0, help="GiB (default 1)")
    p.add_argument("--repeat", type=int, default=3)
    add_baseline_option(p)
    options = p.parse_args()
    size = int((0.25 if options.quick else options.size) * GiB)
    header(f"ssh vs jobworker run: {size / GiB:g} GiB into wc -c, {options.repeat} runs")
    jobworker = str(Path(sys.executable).with_name("jobworker"))
    ssh_runs: list[float] = []
    jw_runs: list[float] = []
    base_runs: list[float] = []
    with workdir() as work:
        pki = make_pki(work / "pki")
        sshd, ssh = start_sshd(work)
        files = pki.client(CLIENT)

        def env_for(server: ServerProcess) -> dict[str, str]:
            return {
                **os.environ,
                "JOBWORKER_SERVER": server.address,
                "JOBWORKER_TLS_CERT": str(files.cert),
                "JOBWORKER_TLS_KEY": str(files.key),
                "JOBWORKER_TLS_CA": str(files.ca),
            }

        try:
            with contextlib.ExitStack() as stack:
                # Few jobs retained: older spools are deleted, not written back while timing.
                server = stack.enter_context(jobworker_server(pki, work, retain=2))
                base = None
                if options.baseline_src is not None:
                    base = stack.enter_context(
                        jobworker_server(
                            pki, work, src=options.baseline_src, name="baseline", retain=2
                        )
                    )
                command = ["head", "-c", str(size), "/dev/zero"]
                run = [jobworker, "run", "--", *command]
                for _ in range(options.repeat):
                    ssh_runs.append(timed([*ssh, *command], size))
                    jw_runs.append(timed(run, size, env_for(server)))
                    if base is not None:
                        base_runs.append(timed(run, size, env_for(base)))
        finally:
            sshd.terminate()
            sshd.wait()
    ssh_rate, jw_rate = statistics.median(ssh_runs), statistics.median(jw_runs)
    row(
        "ssh (OpenSSH, ed25519, loopback)",
        f"{ssh_rate:.0f} MB/s",
        "runs:",
        [round(r) for r in ssh_runs],
    )
    row("jobworker run", f"{jw_rate:.0f} MB/s", "runs:", [round(r) for r in jw_runs])
    row("ratio jobworker / ssh (target >= 1.0)", f"{jw_rate / ssh_rate:.2f}")
    if base_runs:
        base_rate = statistics.median(base_runs)
        row(
            f"jobworker run, baseline {options.baseline_src}",
            f"{base_rate:.0f} MB/s",
            "runs:",
            [round(r) for r in base_runs],
        )
        row("ratio baseline / ssh", f"{base_rate / ssh_rate:.2f}")


if __name__ == "__main__":
    main()

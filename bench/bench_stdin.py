"""stdin throughput: ``jobworker run -- wc -c < FILE`` against ``ssh host wc -c < FILE``.

Both over 127.0.0.1, both with the whole client command timed (start-up, handshake, the
copy, the exit), alternating runs, median reported. The ssh side is a throw-away sshd on
a free 127.0.0.1 port, with host and user keys generated here; the system's sshd and port
22 are never touched. Needs root for sshd (it runs as root, with its own config);
``openssh-server`` is installed with apt-get when ``sshd`` is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import CLIENT, MB, MiB, header, jobworker_server, make_pki, parser, row, workdir

JOBWORKER = str(Path(sys.executable).with_name("jobworker"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ensure_sshd() -> str:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "openssh-server"], check=True, env=env)
    return sshd


def start_sshd(work: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    """A private sshd on a free port; the ssh command line that reaches it."""
    sshd = ensure_sshd()
    keys = work / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "user"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True
        )
    (keys / "authorized_keys").write_text((keys / "user.pub").read_text())
    port = free_port()
    config = keys / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile {keys / 'sshd.pid'}\n"
        "PermitRootLogin yes\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
    ssh = [
        "ssh", "-q", "-p", str(port), "-i", str(keys / "user"),
        "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={keys / 'known'}",
        "-o", "BatchMode=yes", "root@127.0.0.1",
    ]  # fmt: skip
    deadline = time.monotonic() + 10
    while subprocess.run([*ssh, "true"], check=False).returncode != 0:
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the throw-away sshd did not answer within 10 s")
        time.sleep(0.2)
    return proc, ssh


def timed(argv: list[str], source: Path, env: dict[str, str] | None = None) -> float:
    with source.open("rb") as f:
        started = time.perf_counter()
        out = subprocess.run(argv, stdin=f, capture_output=True, env=env, check=True).stdout
        seconds = time.perf_counter() - started
    assert int(out.split()[0]) == source.stat().st_size, out
    return seconds


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--size", type=int, default=1024, help="MiB per run (default 1024)")
    p.add_argument("--repeat", type=int, default=5, help="runs of each, median reported")
    options = p.parse_args()
    size = (128 if options.quick else options.size) * MiB
    repeat = 3 if options.quick else options.repeat
    header(f"stdin throughput: {size // MiB} MiB into wc -c, median of {repeat} alternating runs")
    if os.geteuid() != 0:
        row("skipped", "needs root: the comparison runs a throw-away sshd")
        return
    with workdir() as work:
        source = work / "input"
        with source.open("wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        pki = make_pki(work / "pki")
        sshd, ssh = start_sshd(work)
        try:
            with jobworker_server(pki, work) as server:
                files = pki.client(CLIENT)
                env = dict(
                    os.environ,
                    JOBWORKER_SERVER=server.address,
                    JOBWORKER_TLS_CERT=str(files.cert),
                    JOBWORKER_TLS_KEY=str(files.key),
                    JOBWORKER_TLS_CA=str(files.ca),
                )
                ours: list[float] = []
                theirs: list[float] = []
                for _ in range(repeat):
                    ours.append(timed([JOBWORKER, "run", "--", "wc", "-c"], source, env))
                    theirs.append(timed([*ssh, "wc", "-c"], source))
        finally:
            sshd.terminate()
            sshd.wait()
    jw = size / statistics.median(ours) / MB
    sh = size / statistics.median(theirs) / MB
    row("jobworker run -- wc -c < FILE", f"{jw:.0f} MB/s", "runs (s):", [round(t, 2) for t in ours])
    row("ssh host wc -c < FILE", f"{sh:.0f} MB/s", "runs (s):", [round(t, 2) for t in theirs])
    row("ratio jobworker / ssh", f"{jw / sh:.2f}x", "(target: at least 0.8x)")


if __name__ == "__main__":
    main()

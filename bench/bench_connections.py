"""A connection flood against the front door: 20,000 plain TCP connections (no TLS, no
certificate) and 2000 idle TLS connections with a valid client certificate and no RPC,
held open by flood processes of their own, while another client runs ``jobworker run --
echo``. Reports that client's latency and the server's RSS and open descriptors before,
during and after the flood.

The flood comes from other loopback addresses (127.0.0.2-4) than the client (127.0.0.1),
as it would from other hosts. Every loop is bounded: a flood process opens its count and
holds until told to stop (its stdin closes) or ``HOLD_MAX`` seconds pass. Each flood
process raises its own RLIMIT_NOFILE to the hard limit (so several are needed for more
descriptors than one process may hold). With ``--baseline-src``, an older server (no
connection limits) runs through the same flood first.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import resource
import select
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    CLIENT,
    ServerProcess,
    add_baseline_option,
    fd_count,
    header,
    jobworker_server,
    make_pki,
    parser,
    row,
    versions,
    workdir,
)

from jobworker.api.connections import established
from jobworker.api.pki import PkiPaths

PLAIN = 20_000
TLS = 2000
#: With --quick.
QUICK_PLAIN = 4000
QUICK_TLS = 400
#: Plain connections per flood process, at most (each holds at most its RLIMIT_NOFILE).
PLAIN_PER_PROCESS = 10_000
#: A flood process lets go after this long whatever happens.
HOLD_MAX = 300.0
CONNECT_TIMEOUT = 2.0
#: What an HTTP/2 client sends first: the preface and an empty SETTINGS frame.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
RUNS = 5
MiB = 1 << 20


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tls_context(pki: PkiPaths) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.client_cert("other")), str(pki.client_key("other")))
    context.set_alpn_protocols(["h2"])
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def flood(kind: str, count: int, source: str, port: int, pki: Path) -> None:
    """A flood process: open ``count`` connections from ``source``, print how many were
    opened, then hold them until stdin closes (or ``HOLD_MAX``)."""
    _raise_nofile()
    context = _tls_context(PkiPaths(pki)) if kind == "tls" else None
    held: list[socket.socket] = []
    failed = 0
    began = time.monotonic()
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            if context is not None:  # a gRPC client that connects and sends no RPC
                sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
                sock.sendall(HTTP2_PREFACE)
            held.append(sock)
        except OSError:
            sock.close()
            failed += 1
    opened = {"kind": kind, "opened": len(held), "failed": failed}
    print(json.dumps({**opened, "seconds": round(time.monotonic() - began, 1)}), flush=True)
    select.select([sys.stdin], [], [], HOLD_MAX)
    # The kernel's view (TLS records pending before a FIN would hide it from a read).
    open_at_end = 0
    for sock in held:
        with contextlib.suppress(OSError):
            open_at_end += sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1
        sock.close()
    print(json.dumps({"kind": kind, "still_open": open_at_end}), flush=True)


def _start_floods(
    port: int, pki: PkiPaths, plain: int, tls: int
) -> tuple[list[subprocess.Popen[str]], subprocess.Popen[str]]:
    """The plain flood processes, and the TLS one."""
    me = str(Path(__file__).resolve())
    processes = -(-plain // PLAIN_PER_PROCESS)
    plans = [("plain", plain // processes, f"127.0.0.{2 + n}") for n in range(processes)]
    plans.append(("tls", tls, "127.0.0.9"))
    started = [
        subprocess.Popen(
            [
                sys.executable,
                me,
                "--flood",
                kind,
                str(count),
                source,
                str(port),
                str(pki.directory),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for kind, count, source in plans
    ]
    return started[:-1], started[-1]


def _echo_seconds(server: ServerProcess, pki: PkiPaths) -> float:
    """Wall time of ``jobworker run -- echo`` as client ``bench`` (a process, as a user runs it)."""
    env = {
        **os.environ,
        "JOBWORKER_SERVER": server.address,
        "JOBWORKER_TLS_CERT": str(pki.client_cert(CLIENT)),
        "JOBWORKER_TLS_KEY": str(pki.client_key(CLIENT)),
        "JOBWORKER_TLS_CA": str(pki.ca_cert),
    }
    jobworker = str(Path(sys.executable).with_name("jobworker"))
    began = time.monotonic()
    result = subprocess.run(
        [jobworker, "run", "--", "echo", "hello"], env=env, capture_output=True, timeout=120
    )
    took = time.monotonic() - began
    if result.stdout != b"hello\n":
        raise RuntimeError(f"run -- echo failed: {result.stderr.decode()[-500:]}")
    return took


def _echo(server: ServerProcess, pki: PkiPaths) -> str:
    times = []
    for _ in range(RUNS):
        try:
            times.append(_echo_seconds(server, pki))
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            return f"FAILED ({str(err)[-160:]})"
    return f"median {statistics.median(times):.2f} s, max {max(times):.2f} s"


def _gate_closed(server: ServerProcess) -> int:
    """Connections the server's per-address gate shut down, from its log."""
    closed = 0
    for line in server.log_path.read_text().splitlines():
        if '"connections_over_peer_limit"' in line:
            closed += json.loads(line).get("closed", 0)
    return closed


def _held_by_address(port: int) -> dict[str, int]:
    return dict(collections.Counter(c.peer for c in established(port)).most_common())


def _memory(server: ServerProcess) -> str:
    status = server.status()
    return f"RSS {status['VmRSS'] / MiB:.0f} MiB, fds {fd_count(server.pid)}"


def _line(process: subprocess.Popen[str]) -> dict[str, object]:
    assert process.stdout is not None
    found: dict[str, object] = json.loads(process.stdout.readline() or "{}")
    return found


def one_version(
    name: str, src: Path | None, pki: PkiPaths, work: Path, plain: int, tls: int
) -> None:
    with jobworker_server(pki, work, src=src, name=name.replace(" ", "-"), retain=50) as server:
        port = int(server.address.rsplit(":", 1)[1])
        _echo(server, pki)  # warm up
        row(f"{name}: before the flood", _memory(server), "run -- echo:", _echo(server, pki))
        baseline_rss = server.status()["VmRSS"]
        plain_floods, tls_flood = _start_floods(port, pki, plain, tls)
        floods = [*plain_floods, tls_flood]
        try:
            row(f"{name}: plain flood opened", [_line(f) for f in plain_floods])
            row(f"{name}: connections the server holds, by address", _held_by_address(port))
            row(f"{name}: during (TLS flood connecting)", _memory(server), "run -- echo:",
                _echo(server, pki))  # fmt: skip
            row(f"{name}: TLS flood opened", _line(tls_flood))
            row(f"{name}: connections the server holds, by address", _held_by_address(port))
            row(f"{name}: during (all opened)", _memory(server), "run -- echo:",
                _echo(server, pki))  # fmt: skip
            peak = server.status()["VmHWM"]
        finally:
            for process in floods:
                assert process.stdin is not None
                process.stdin.close()
            ends = [_line(f) for f in floods]
            for process in floods:
                process.wait(60)
        row(f"{name}: flood connections still open at its end", ends)
        row(f"{name}: closed by the per-address gate", _gate_closed(server))
        time.sleep(5)
        after = server.status()["VmRSS"]
        row(f"{name}: after the flood (5 s)", _memory(server), "run -- echo:", _echo(server, pki))
        row(
            f"{name}: RSS after - before / peak",
            f"{(after - baseline_rss) / MiB:+.0f} MiB / {peak / MiB:.0f} MiB",
        )


def main() -> None:
    p = parser(__doc__ or "")
    add_baseline_option(p)
    p.add_argument("--flood", nargs=5, help=argparse.SUPPRESS)
    options = p.parse_args()
    if options.flood:
        kind, count, source, port, pki = options.flood
        flood(kind, int(count), source, int(port), Path(pki))
        return
    plain, tls = (QUICK_PLAIN, QUICK_TLS) if options.quick else (PLAIN, TLS)
    header(f"{plain} plain TCP and {tls} idle TLS connections, while run -- echo runs")
    with workdir() as work:
        pki = make_pki(work / "pki")
        for name, src in versions(options.baseline_src):
            one_version(name, src, pki, work, plain, tls)


if __name__ == "__main__":
    main()

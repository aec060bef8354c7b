"""Shared pieces of the benchmarks: a dev PKI, servers run as subprocesses, /proc readings.

Every benchmark talks to servers in other processes over mTLS on 127.0.0.1, as a real
client would, so the client's own CPU use (and its GIL) is not charged to the server.
Followers run as processes of their own too (``_follower.py``), one per stream.
"""

from __future__ import annotations

# jobworker.api.tls sets grpc's process-wide TLS options while it imports grpc: it goes first.
from jobworker.api import tls  # isort: split

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from jobworker.api.pki import PkiPaths, init_pki

BENCH_DIR = Path(__file__).resolve().parent
CLIENT = "bench"
GiB = 1 << 30
MiB = 1 << 20
MB = 1_000_000

__all__ = ["tls"]


def make_pki(directory: Path) -> PkiPaths:
    """A dev PKI whose one client, ``bench``, is an admin."""
    return init_pki(directory, clients=[(CLIENT, "admin"), ("other", "user")])


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (bytes) and Threads of ``pid``, from /proc/PID/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def header(title: str) -> None:
    info = machine()
    print(f"== {title}")
    print(
        f"   machine: {info['nproc']} cores, {info['cpu']}, Linux {info['kernel']},"
        f" Python {info['python']}"
    )


def row(label: str, *values: object) -> None:
    print(f"   {label:<44} " + "  ".join(str(v) for v in values), flush=True)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes in all)")
    return p


def add_baseline_option(p: argparse.ArgumentParser) -> None:
    """``--baseline-src DIR``: another version's server, run beside this one's."""
    p.add_argument(
        "--baseline-src",
        type=Path,
        help="also run this checkout's server, alternating (git archive REV | tar -x -C DIR)",
    )


def versions(baseline_src: Path | None) -> list[tuple[str, Path | None]]:
    """(name, source) of each server version to run: the baseline first, then this one."""
    found: list[tuple[str, Path | None]] = [("jobworker", None)]
    if baseline_src is not None:
        found.insert(0, (f"baseline {baseline_src.name}", baseline_src))
    return found


@attrs.define
class ServerProcess:
    """A server started as a subprocess; it prints its address on stdout once serving."""

    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def ingest_status(self) -> dict[str, int]:
        """VmRSS and VmHWM of its ingest process (zeros while there is none)."""
        found = ingest_pids(self.pid)
        return proc_status(found[0]) if found else {"VmRSS": 0, "VmHWM": 0, "Threads": 0}

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextlib.contextmanager
def server_process(
    args: Sequence[str], log_dir: Path, name: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Run ``python ARGS`` until the block exits (SIGTERM, then SIGKILL after a minute)."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=log, cwd=BENCH_DIR, env=env
        )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line:
        proc.wait()
        raise RuntimeError(f"{name} did not start: see {log_path}:\n{log_path.read_text()[-2000:]}")
    server = ServerProcess(proc, line, log_path)
    try:
        yield server
    finally:
        server.stop()
        proc.stdout.close()


@contextlib.contextmanager
def jobworker_server(
    pki: PkiPaths,
    work: Path,
    *,
    retain: int = 1000,
    max_running: int = 1000,
    log_level: str = "info",
    isolation: bool = True,
    metrics: bool = False,
    extra: Sequence[str] = (),
    src: Path | None = None,
    name: str = "jobworker-server",
    wrapper: Path | None = None,
) -> Iterator[ServerProcess]:
    """``bench/_server.py``: ``jobworker.api.server.serve`` as ``jobworker serve`` runs it
    (``isolation=False``: as with ``--no-isolation``); ``extra`` goes to _server.py.

    ``src``: a checkout of another jobworker version (``git archive REV | tar -x -C DIR``)
    whose server runs instead, for a baseline in the same run. ``wrapper``: a script that
    patches something, then runs the server script it is given first."""
    # For A/B runs of a change: a script that patches jobworker, then runs _server.py.
    script = os.environ.get("JOBWORKER_BENCH_SERVER", str(BENCH_DIR / "_server.py"))
    env = None
    if src is not None:
        script = str(src / "bench" / "_server.py")
        env = {**os.environ, "PYTHONPATH": str(src)}
    args = [
        script,
        "--pki",
        str(pki.directory),
        "--retain",
        str(retain),
        "--max-running",
        str(max_running),
        "--log-level",
        log_level,
        *([] if isolation else ["--no-isolation"]),
        *(["--metrics"] if metrics else []),
        *extra,
    ]
    if wrapper is not None:
        args.insert(0, str(wrapper))
    with server_process(args, work, name, env) as server:
        yield server


@contextlib.contextmanager
def bare_server(pki: PkiPaths, work: Path, message_bytes: int) -> Iterator[ServerProcess]:
    """``bench/_bare_server.py``: the stack's ceiling, a bare grpc.aio streaming RPC."""
    args = [str(BENCH_DIR / "_bare_server.py"), "--pki", str(pki.directory)]
    args += ["--message-bytes", str(message_bytes)]
    with server_process(args, work, "bare-server") as server:
        yield server


@attrs.define
class Followers:
    """Follower processes (``_follower.py``), connected and waiting for ``go``."""

    procs: list[subprocess.Popen[str]]

    def go(self, job: str) -> float:
        """Send the job id (or the byte count); returns the time it was sent."""
        began = time.perf_counter()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(job + "\n")
            proc.stdin.flush()
        return began

    def results(self, timeout: float = 3600) -> list[dict[str, Any]]:
        results = []
        for proc in self.procs:
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"a follower failed with status {proc.returncode}")
            results.append(json.loads(out))
        return results

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def followers(
    address: str,
    pki: PkiPaths,
    count: int,
    *,
    mode: str = "read",
    digest: bool = False,
    relay: bool = False,
) -> Followers:
    """``count`` follower processes, each connected to ``address`` before this returns;
    ``relay``: never reading from a cluster's node (direct output), always through it."""
    args = [sys.executable, str(BENCH_DIR / "_follower.py"), address, str(pki.directory)]
    args += ["--mode", mode] + (["--digest"] if digest else []) + (["--relay"] if relay else [])
    procs = [
        subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a follower could not connect")
    return Followers(procs)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="jobworker-bench-") as tmp:
        yield Path(tmp)


def wait_until(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far, with its ingest process's (the
    server's work, done in a process of its own)."""
    return sum(_own_cpu_seconds(p) for p in (pid, *ingest_pids(pid)))


def _own_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ingest_pids(pid: int) -> list[int]:
    """The ingest process(es) of the server ``pid`` (jobworker.backends.local.ingest_process)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == pid and b"jobworker-ingest" in Path(
                f"/proc/{entry}/cmdline"
            ).read_bytes().split(b"\0"):
                found.append(int(entry))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found

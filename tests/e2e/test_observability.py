"""``jobworker top``, ``status --usage`` and the metrics endpoint's address rule, as a user
runs them: the installed command against a ``jobworker serve`` subprocess."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import termios
import time
from collections.abc import Callable

from tests.e2e.conftest import (
    INTERRUPTIBLE,
    JOBWORKER,
    Cli,
    Pki,
    StartServer,
    clean_env,
    jobworker,
)

BUSY = ("sh", "-c", "while :; do :; done")


def test_top_once_shows_a_row_per_running_job(cli: Cli) -> None:
    jobs = [cli.ok("start", "--", "sleep", "60").strip() for _ in range(3)]
    try:
        time.sleep(1.5)  # at least one sample each
        frame = cli.ok("top", "--once", "--sort", "id")
        lines = frame.splitlines()
        assert lines[1].split()[:3] == ["JOB", "OWNER", "CPU%"]
        rows = {line.split()[0]: line.split() for line in lines[2:]}
        for job_id in jobs:
            assert job_id in rows, frame
            assert rows[job_id][1] == "alice"
            assert rows[job_id][-2:] == ["sleep", "60"]
        # root (admin) sees alice's jobs too; a finished job is not a row.
        assert set(jobs) <= set(cli.ok("top", "--once", as_="root").split())
    finally:
        for job_id in jobs:
            cli.ok("stop", "--grace", "0", "--", job_id)
    assert not set(jobs) & set(cli.ok("top", "--once").split())


def test_status_usage_json_gives_rising_cpu_samples_and_a_chart(cli: Cli) -> None:
    job_id = cli.ok("start", "--", *BUSY).strip()
    try:
        time.sleep(3.5)
        data = json.loads(cli.ok("status", "--usage", "--json", "--", job_id))
        chart = cli.ok("status", "--usage", "--", job_id)
    finally:
        cli.ok("stop", "--grace", "0", "--", job_id)
    assert data["job_id"] == job_id and data["source"] == "proc"
    samples = data["samples"]
    assert len(samples) >= 3
    assert list(samples[0]) == [
        "time", "cpu_usec", "memory_bytes", "pids", "memory_peak_bytes", "io_read_bytes",
        "io_write_bytes",
    ]  # fmt: skip
    cpu = [s["cpu_usec"] for s in samples]
    assert cpu == sorted(cpu) and cpu[-1] > cpu[0], cpu  # a busy loop burns CPU
    assert all(s["pids"] >= 1 for s in samples), samples
    # The first sample is taken as the command starts: on a loaded machine it can land in
    # the instant of its exec, before the new image has faulted in a page (RSS 0).
    assert all(s["memory_bytes"] > 0 for s in samples[1:]), samples
    lines = chart.splitlines()
    assert lines[0].startswith(f"job {job_id}: ") and "from proc" in lines[0]
    assert lines[1].startswith("cpu ") and "peak" in lines[1]
    assert lines[2].startswith("memory ")
    assert lines[3] == (  # no cgroupv2 plugin: the isolation's bounds, and memory unbounded
        "limits  pids 1024 (RLIMIT_NPROC of the job's uid);"
        " tmpfs 1G (/tmp, /var/tmp, /dev/shm together); memory: none"
    )
    # Another user's job is as unknown as a job that does not exist.
    result = jobworker("status", "--usage", "--", job_id, env=cli.env("mallory"))
    assert result.returncode == 1 and b"PERMISSION_DENIED" in result.stderr


def test_metrics_on_a_public_address_need_tls_or_a_flag(
    start_server: StartServer, pki: Pki
) -> None:
    args = ["serve", *pki.server_args(), "--plugin", "metrics", "--metrics-listen", "0.0.0.0:0"]
    result = jobworker(*args, env=clean_env())
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "jobworker: error: --metrics-listen 0.0.0.0:0 is not a loopback address: add "
        "--metrics-tls (client certificates from the server's CA) or, to serve plain HTTP "
        "on purpose, --metrics-plain-http\n"
    )
    server = start_server(*pki.server_args(), "--plugin", "metrics", "--metrics-listen",
                          "0.0.0.0:0", "--metrics-plain-http")  # fmt: skip
    listening = [e for e in server.events() if e["event"] == "metrics_listening"]
    assert listening and str(listening[0]["address"]).startswith("0.0.0.0:")


# -- top's keys, on a real terminal ---------------------------------------------------------

CLEAR = b"\x1b[H\x1b[2J"
#: A job that holds about 30 MB in a shell variable (a loop, so the shell is not replaced).
BIG = ("sh", "-c", "x=$(head -c 30000000 /dev/zero | tr '\\000' x); while :; do sleep 1; done")


class Terminal:
    """``jobworker top`` on a pseudo-terminal that is its controlling terminal (``setsid
    -c``), so that Ctrl-C on it reaches ``top`` as from a keyboard."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.settings = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(
            ["setsid", "-c", "-w", *INTERRUPTIBLE, JOBWORKER, "top", "--interval", "0.2", *args],
            stdin=self.slave, stdout=self.slave, stderr=self.slave, env=env,
        )  # fmt: skip
        self.output = b""

    def frame(self, wanted: Callable[[str], bool], timeout: float = 20.0) -> str:
        """The first frame from now on for which ``wanted`` holds."""
        deadline = time.monotonic() + timeout
        seen = len(self.output)
        while True:
            frames = self.output[seen:].split(CLEAR)
            for text in (f.decode(errors="replace") for f in frames[1:-1]):
                if wanted(text):
                    return text
            left = deadline - time.monotonic()
            assert left > 0, f"no such frame in {timeout}s; output:\n{self.output[-3000:]!r}"
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                self.output += os.read(self.master, 65536)

    def press(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self) -> int:
        """The exit code, reading what is left so that ``top`` never blocks on a full pty."""
        deadline = time.monotonic() + 20
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "top did not exit"
            if select.select([self.master], [], [], 0.1)[0]:
                self.output += os.read(self.master, 65536)
        # What it wrote last may still wait in the terminal: its exit says nothing of that.
        while select.select([self.master], [], [], 0)[0]:
            try:
                part = os.read(self.master, 65536)
            except OSError:  # EIO: nothing more, and no process holds the terminal
                break
            if not part:
                break
            self.output += part
        return self.proc.returncode

    def restored(self) -> bool:
        return termios.tcgetattr(self.slave) == self.settings

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def order(text: str, *job_ids: str) -> list[str]:
    """``job_ids`` in the order the frame shows them."""
    rows = [line.split()[0] for line in text.splitlines() if line.split()]
    return sorted(job_ids, key=lambda j: rows.index(j) if j in rows else len(rows))


def shows(*job_ids: str, sort: str, memory: bool = False) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        lines = text.splitlines()
        if len(lines) < 2 or not lines[1].endswith(f"sorted by {sort}"):
            return False
        rows = {line.split()[0]: line.split() for line in lines[3:] if line.split()}
        if not all(j in rows for j in job_ids):
            return False
        return not memory or all(rows[j][3] != "-" for j in job_ids)

    return check


def test_top_keys_change_the_order_at_once_and_q_restores_the_terminal(cli: Cli) -> None:
    big = cli.ok("start", "--", *BIG).strip()
    small = cli.ok("start", "--", "sleep", "60").strip()
    terminal = Terminal(cli.env("alice"))
    try:
        first = terminal.frame(shows(big, small, sort="cpu", memory=True))
        assert first.splitlines()[0].startswith("keys: c cpu  m mem")
        assert not terminal.restored()  # cbreak: no echo, no line editing
        terminal.press(b"m")
        by_memory = terminal.frame(shows(big, small, sort="mem"))
        assert order(by_memory, big, small) == [big, small], by_memory
        terminal.press(b"r")
        reversed_ = terminal.frame(shows(big, small, sort="mem, reversed"))
        assert order(reversed_, big, small) == [small, big], reversed_
        terminal.press(b"t")  # oldest first, reversed: the newest first
        assert order(terminal.frame(shows(big, small, sort="runtime, reversed")), big, small) == [
            small,
            big,
        ]
        terminal.press(b"r")
        assert order(terminal.frame(shows(big, small, sort="runtime")), big, small) == [big, small]
        terminal.press(b"q")
        assert terminal.wait() == 0
        assert terminal.restored()
    finally:
        terminal.close()
        for job_id in (big, small):
            cli.ok("stop", "--grace", "0", "--", job_id)


def test_top_restores_the_terminal_on_ctrl_c_and_on_an_error(
    start_server: StartServer, pki: Pki
) -> None:
    server = start_server(*pki.server_args())
    env = pki.client_env("alice", server.address)
    terminal = Terminal(env)
    try:
        terminal.frame(lambda text: "sorted by cpu" in text)
        terminal.press(b"\x03")  # Ctrl-C, through the terminal's line discipline
        assert terminal.wait() == 0
        assert terminal.restored()
    finally:
        terminal.close()
    terminal = Terminal(env)
    try:
        terminal.frame(lambda text: "sorted by cpu" in text)
        assert server.terminate() == 0  # top's next fetch fails
        assert terminal.wait() == 1
        assert b"jobworker: UNAVAILABLE" in terminal.output, terminal.output[-2000:]
        assert terminal.restored()
    finally:
        terminal.close()

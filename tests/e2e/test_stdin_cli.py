"""stdin through the CLI: ``run`` forwards a pipe or a file, ``start -i`` + ``write``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from tests.e2e.conftest import COMMAND_TIMEOUT_S, JOBWORKER, Cli


def run_with_input(cli: Cli, stdin: bytes | Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``jobworker ARGS`` with ``stdin`` as its stdin: bytes through a pipe, or a file."""
    if isinstance(stdin, Path):
        with stdin.open("rb") as f:
            return subprocess.run(
                [JOBWORKER, *args], stdin=f, capture_output=True, env=cli.env("alice"),
                timeout=COMMAND_TIMEOUT_S, check=False,
            )  # fmt: skip
    return subprocess.run(
        [JOBWORKER, *args], input=stdin, capture_output=True, env=cli.env("alice"),
        timeout=COMMAND_TIMEOUT_S, check=False,
    )  # fmt: skip


def test_run_forwards_a_pipe(cli: Cli) -> None:
    result = run_with_input(cli, b"hi\n", "run", "--", "cat")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"hi\n", b"")


def test_run_forwards_20_mb_of_random_bytes_from_a_file(cli: Cli, tmp_path: Path) -> None:
    data = os.urandom(20 << 20)
    source = tmp_path / "random"
    source.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    summed = run_with_input(cli, source, "run", "--", "sha256sum")
    assert summed.returncode == 0, summed.stderr
    assert summed.stdout.split()[0].decode() == digest
    copied = run_with_input(cli, source, "run", "--", "cat")
    assert copied.returncode == 0, copied.stderr
    assert hashlib.sha256(copied.stdout).hexdigest() == digest


def test_run_keeps_nul_bytes(cli: Cli) -> None:
    result = run_with_input(cli, b"\0a\0\0b", "run", "--", "cat")
    assert result.stdout == b"\0a\0\0b"


def test_a_job_that_never_reads_does_not_hang_run(cli: Cli) -> None:
    """Endless input (``yes``) into a job that exits without reading: run exits with the
    job's code, quietly."""
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        started = time.monotonic()
        result = subprocess.run(
            [JOBWORKER, "run", "--", "sh", "-c", "sleep 1; exit 5"], stdin=yes.stdout,
            capture_output=True, env=cli.env("alice"), timeout=COMMAND_TIMEOUT_S, check=False,
        )  # fmt: skip
    finally:
        yes.kill()
        yes.wait()
        assert yes.stdout is not None
        yes.stdout.close()
    assert (result.returncode, result.stderr) == (5, b"")
    assert time.monotonic() - started < 20


def test_start_i_then_write(cli: Cli) -> None:
    job_id = cli.ok("start", "-i", "--", "cat").strip()
    first = run_with_input(cli, b"one ", "write", "--keep-open", job_id)
    assert first.returncode == 0, first.stderr
    last = run_with_input(cli, b"two", "write", job_id)
    assert last.returncode == 0, last.stderr
    assert cli.ok("logs", "--follow", job_id) == "one two"
    closed = run_with_input(cli, b"late", "write", job_id)
    assert closed.returncode == 1
    assert closed.stderr.decode() == (
        f"jobworker: job {job_id}'s stdin is closed (the job ended or closed it):"
        " 0 bytes of our input went in, the rest was dropped\n"
    )


def test_write_to_a_job_started_without_i_says_how_to_fix_it(cli: Cli) -> None:
    job_id = cli.ok("start", "--", "sleep", "30").strip()
    try:
        result = run_with_input(cli, b"x", "write", job_id)
        assert result.returncode == 1
        assert result.stderr.decode() == (
            f"jobworker: FAILED_PRECONDITION: job {job_id} was started without stdin (it"
            " reads /dev/null); start it with `-i` (StartJobRequest.stdin) to write to it\n"
        )
    finally:
        cli.ok("stop", "--grace", "0", job_id)

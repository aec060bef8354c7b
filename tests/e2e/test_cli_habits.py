"""Habits from ssh, docker and the shell, through the real CLI and server: options before
the command, a shell's 127 and 126, a hint for an unknown job id, and huge arguments
refused before they are sent."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.e2e.conftest import JOBWORKER, Cli, clean_env, jobworker
from tests.e2e.test_light_client import imported, server_only


def test_connection_options_before_the_command(cli: Cli) -> None:
    env = cli.env("alice")
    flags = [
        f"--server={env.pop('JOBWORKER_SERVER')}",
        "--tls-cert", env.pop("JOBWORKER_TLS_CERT"),
        "--tls-key", env.pop("JOBWORKER_TLS_KEY"),
        f"--tls-ca={env.pop('JOBWORKER_TLS_CA')}",
    ]  # fmt: skip
    ran = jobworker(*flags, "run", "--", "echo", "before", env=env)
    assert (ran.returncode, ran.stdout) == (0, b"before\n"), ran.stderr
    listed = jobworker(*flags, "--json", "list", "--running", env=env)
    assert listed.returncode == 0 and listed.stdout.startswith(b"["), listed.stderr
    after = jobworker("run", *flags, "--", "echo", "after", env=env)
    assert after.stdout == b"after\n"


def test_an_option_no_command_has_is_refused_as_before() -> None:
    result = jobworker("--frobnicate", "list", env=clean_env())
    assert result.returncode == 2
    assert b"unrecognized arguments: --frobnicate" in result.stderr


def test_a_command_that_does_not_exist_exits_127(cli: Cli) -> None:
    for verb in ("run", "start"):
        result = cli(verb, "--", "no-such-command-here")
        assert result.returncode == 127, result.stderr
        assert result.stderr.decode() == (
            "jobworker: FAILED_PRECONDITION: cannot execute 'no-such-command-here': No such"
            " file or directory\n"
        )


def test_a_command_that_cannot_be_executed_exits_126(cli: Cli) -> None:
    for path, why in (("/etc/hostname", "Exec format error"), ("/usr/bin", "Permission denied")):
        result = cli("run", "--", path)
        assert result.returncode == 126, result.stderr
        assert result.stderr.decode() == (
            f"jobworker: FAILED_PRECONDITION: cannot execute '{path}': {why}\n"
        )


def test_an_unknown_job_id_says_how_to_list_jobs(cli: Cli) -> None:
    result = cli("status", "--", "AAAAAAAAAAAAAAAAAAAAAA")
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "jobworker: NOT_FOUND: job 'AAAAAAAAAAAAAAAAAAAAAA' not found (`jobworker list` shows"
        " the jobs you may see)\n"
    )


def test_huge_arguments_are_refused_before_they_are_sent(cli: Cli) -> None:
    """40 arguments of 120 kB (the kernel allows 128 kB each, and 4.8 MB in all once the
    stack limit is lifted): over the server's 4 MiB per request."""
    script = (
        'ulimit -s unlimited; a=$(head -c 120000 /dev/zero | tr "\\0" a); set --;'
        ' for i in $(seq 40); do set -- "$@" "$a"; done; exec "$0" run -- echo "$@"'
    )
    result = subprocess.run(
        ["sh", "-c", script, JOBWORKER],
        capture_output=True,
        env=cli.env("alice"),
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "jobworker: INVALID_ARGUMENT: the command, its arguments and environment take 4.6 MiB,"
        " over the 4 MiB a request may carry: pass large data through the job's stdin"
        " (`jobworker run`, a pipe or -i) or a file\n"
    )


def test_an_option_of_a_command_of_a_command_before_both(tmp_path: Path) -> None:
    env = clean_env(JOBWORKER_HOME=str(tmp_path / "home"))
    made = jobworker("--dir", str(tmp_path / "pki"), "certs", "init", "--client", "bob", env=env)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "pki" / "bob.pem").is_file()


def test_options_before_a_client_command_keep_it_light(cli: Cli) -> None:
    """Moving the options needs only the client commands' parser: no server module."""
    env = cli.env("alice")
    server = env.pop("JOBWORKER_SERVER")
    result = subprocess.run(
        [JOBWORKER, "--server", server, "list"],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
        timeout=60,
        check=False,
    )
    assert server_only(imported(result)) == []

"""The CLI end to end: ``certs init``, ``serve`` and the client commands as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    COMMAND_TIMEOUT_S,
    JOBWORKER,
    Cli,
    Pki,
    StartServer,
    clean_env,
    jobworker,
)


def test_certs_init_prints_files_and_how_to_use_them(pki: Pki) -> None:
    out = pki.init_output
    d = pki.directory
    assert f"created {d / 'alice.pem'}" in out.replace("  ", " ")
    assert f"--tls-cert {d / 'server.pem'}" in out
    assert f"--authz {d / 'authz.toml'}" in out
    assert f"JOBWORKER_TLS_CERT={d / 'root.pem'}" in out
    # The second init kept the whitelist, and says so.
    assert f"{d / 'authz.toml'} was kept as it is; check it lists mallory" in out
    assert oct((d / "alice-key.pem").stat().st_mode & 0o777) == "0o600"


def test_run_passes_the_exit_code_through(cli: Cli) -> None:
    assert cli("run", "--", "sh", "-c", "exit 3").returncode == 3
    assert cli("run", "--", "true").returncode == 0


def test_run_killed_by_a_signal_exits_128_plus_the_signal(cli: Cli) -> None:
    assert cli("run", "--", "sh", "-c", "kill -KILL $$").returncode == 128 + signal.SIGKILL


def test_run_separates_stdout_and_stderr_byte_for_byte(cli: Cli, job_tmp_path: Path) -> None:
    out, err = job_tmp_path / "out.bin", job_tmp_path / "err.bin"
    out.write_bytes(os.urandom(300_000) + b"\x00\xff\n")
    err.write_bytes(b"\r\n\x00" + os.urandom(200_000))
    script = 'cat "$1"; cat "$2" >&2'
    result = cli("run", "--", "sh", "-c", script, "sh", str(out), str(err))
    assert result.returncode == 0
    assert result.stdout == out.read_bytes()
    assert result.stderr == err.read_bytes()


# Job ids may start with "-": the tests, like scripts, put them after "--".


def test_logs_follow_gets_everything_of_a_running_job(cli: Cli) -> None:
    script = "i=0; while [ $i -lt 40 ]; do echo line $i; i=$((i+1)); sleep 0.05; done"
    job_id = cli.ok("start", "--", "sh", "-c", script).strip()
    assert cli.status(job_id)["state"] == "running"
    followed = cli("logs", "-f", "--", job_id)
    expected = "".join(f"line {i}\n" for i in range(40)).encode()
    assert (followed.returncode, followed.stdout, followed.stderr) == (0, expected, b"")
    assert cli.status(job_id)["reason"] == "exited"
    # Without -f: what exists now, which is everything once the job is over.
    assert cli("logs", "--", job_id).stdout == expected


def test_stop_records_who_stopped_the_job(cli: Cli) -> None:
    job_id = cli.ok("start", "--", "sleep", "60").strip()
    assert cli("stop", "--grace", "5", "--", job_id).returncode == 0
    status = cli.status(job_id)
    assert status["state"] == "exited"
    assert status["reason"] == "stopped"
    assert status["stopped_by"] == "alice"
    assert status["signal"] == signal.SIGTERM
    assert status["exit_code"] is None


def test_status_json_has_the_documented_fields(cli: Cli) -> None:
    job_id = cli.ok("start", "--env", "GREETING=hi", "--", "sh", "-c", "echo $GREETING").strip()
    cli.ok("logs", "-f", "--", job_id)
    status = cli.status(job_id)
    assert list(status) == [
        "job_id", "state", "reason", "exit_code", "signal", "owner", "stopped_by",
        "escalated", "started_at", "ended_at", "command", "args", "limits", "usage",
        "containment", "output_bytes", "pid", "user", "uid", "isolation", "node",
    ]  # fmt: skip
    assert (status["user"], status["uid"]) == ("nobody", 65534)  # the server runs as root
    assert status["isolation"] == "namespaces, user nobody(65534), network host"
    assert status["job_id"] == job_id
    assert (status["state"], status["reason"], status["exit_code"]) == ("exited", "exited", 0)
    assert (status["command"], status["args"]) == ("sh", ["-c", "echo $GREETING"])
    assert isinstance(status["output_bytes"], int) and status["output_bytes"] >= len(b"hi\n")
    assert isinstance(status["started_at"], float)


def test_list_json_shows_own_jobs_and_admin_sees_all(cli: Cli) -> None:
    job_id = cli.ok("start", "--", "true").strip()
    mine = json.loads(cli.ok("list", "--json"))
    assert job_id in [job["job_id"] for job in mine]
    assert {job["owner"] for job in mine} == {"alice"}
    everyone = json.loads(cli.ok("list", "--json", as_="root"))
    assert job_id in [job["job_id"] for job in everyone]
    table = cli.ok("list")
    assert table.splitlines()[0].split() == [
        "JOB",
        "STATE",
        "RESULT",
        "OWNER",
        "STARTED",
        "COMMAND",
    ]


def test_server_errors_are_one_line_with_the_status_code(cli: Cli) -> None:
    missing = cli("status", "no-such-job")
    assert missing.returncode == 1
    assert missing.stderr.decode() == "jobworker: NOT_FOUND: job 'no-such-job' not found\n"
    root_job = cli.ok("start", "--", "true", as_="root").strip()
    hidden = cli("logs", "--", root_job)
    assert (hidden.returncode, hidden.stderr.decode().split(":")[1]) == (1, " NOT_FOUND")
    refused = cli("list", as_="mallory")
    assert refused.returncode == 1
    assert refused.stderr.decode().startswith("jobworker: PERMISSION_DENIED: ")
    assert refused.stderr.count(b"\n") == 1


def test_unreachable_server_is_a_clear_error(cli: Cli, pki: Pki) -> None:
    env = pki.client_env("alice", "127.0.0.1:1")
    result = jobworker("list", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith(
        b"jobworker: UNAVAILABLE: cannot reach jobworker at 127.0.0.1:1:"
    )
    assert result.stderr.count(b"\n") == 1


def test_ctrl_c_stops_the_job_and_exits_130(cli: Cli) -> None:
    run = subprocess.Popen(
        [JOBWORKER, "run", "--", "sh", "-c", "echo started; exec sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env("alice"),
    )
    try:
        assert run.stdout is not None
        assert run.stdout.readline() == b"started\n"
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=COMMAND_TIMEOUT_S)
    finally:
        run.kill()
        run.wait()
    assert run.returncode == 130
    message = err.decode()
    assert message.startswith("jobworker: interrupted: stopped job ")
    job_id = message.split()[-1]
    status = cli.status(job_id)
    assert (status["reason"], status["stopped_by"]) == ("stopped", "alice")


def test_plugins_json_lists_authz() -> None:
    result = jobworker("plugins", "--json", "--plugin", "authz", env=clean_env())
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == ["authz", "isolation"]
    assert rows[1]["mode"].startswith("namespaces (pid, mount, ipc, uts, cgroup; network host)")
    assert "jobworker_isolate" in rows[1]["hooks"]
    assert isinstance(rows[0]["version"], str)
    assert "jobworker_authorize" in rows[0]["hooks"]
    every = json.loads(jobworker("plugins", "--json", env=clean_env()).stdout)
    assert {"authz", "audit-log", "cgroupv2"} <= {row["name"] for row in every}


def test_unknown_plugin_is_one_line_listing_the_available_ones(pki: Pki) -> None:
    result = jobworker("serve", "--plugin", "no-such-plugin", *pki.server_args(), env=clean_env())
    assert result.returncode == 2
    assert result.stderr.decode().startswith(
        "jobworker: error: unknown plugin 'no-such-plugin'; available: authz, "
    )
    assert result.stderr.count(b"\n") == 1
    assert result.stdout == b""


def test_zero_config_first_run(start_server: StartServer, tmp_path: Path) -> None:
    env = clean_env(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "data"))
    server = start_server(f"--spool-dir={tmp_path / 'spool'}", env=env)
    pki_dir = tmp_path / "data" / "jobworker" / "pki"
    assert (pki_dir / "admin.pem").is_file()
    dev_pki = [event for event in server.events() if event["event"] == "dev_pki"]
    assert dev_pki and dev_pki[0]["directory"] == str(pki_dir)
    result = jobworker("run", "--", "echo", "hi", env={**env, "JOBWORKER_SERVER": server.address})
    assert (result.returncode, result.stdout, result.stderr) == (0, b"hi\n", b"")


def test_partial_tls_flags_refuse_to_serve(start_server: StartServer, pki: Pki) -> None:
    result = jobworker("serve", f"--tls-cert={pki.directory / 'server.pem'}", env=clean_env())
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "jobworker: error: --tls-cert, --tls-key and --tls-ca go together: "
        "missing --tls-key, --tls-ca\n"
    )


def _live_processes_in_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that still run (zombies waiting for a reaper excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited while we looked
        state, _ppid, group = stat.rpartition(")")[2].split()[:3]
        if int(group) == pgid and state != "Z":
            found.append(int(entry.name))
    return found


def test_sigterm_stops_jobs_and_exits_0(
    start_server: StartServer, pki: Pki, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    server = start_server(*pki.server_args(), f"--spool-dir={spool}")
    env = pki.client_env("alice", server.address)
    start = jobworker("start", "--", "sh", "-c", "sleep 300 & sleep 300", env=env)
    job_id = start.stdout.decode().strip()
    status = json.loads(jobworker("status", "--json", "--", job_id, env=env).stdout)
    pid = status["pid"]
    deadline = time.monotonic() + 10
    while len(_live_processes_in_group(pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # until sh has started its background sleep
    assert len(_live_processes_in_group(pid)) >= 2
    assert server.terminate() == 0
    assert _live_processes_in_group(pid) == []
    assert "server_stopped" in server.log()


@pytest.mark.parametrize("command", [["status", "x"], ["list"], ["run", "--", "true"]])
def test_client_commands_without_certificates_explain_what_to_do(
    command: list[str], tmp_path: Path
) -> None:
    result = jobworker(*command, env=clean_env(JOBWORKER_HOME=str(tmp_path / "none")))
    assert result.returncode == 2
    assert b"no client certificate: pass --tls-cert" in result.stderr
    assert result.stderr.count(b"\n") == 1

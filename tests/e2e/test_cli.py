"""The CLI end to end: ``certs init``, ``serve`` and the client commands as subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    COMMAND_TIMEOUT_S,
    INTERRUPTIBLE,
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
    # The job waits on its stdin after its first line, however slow the machine: the
    # follower is attached to a running job before the rest comes.
    script = "echo line 0; read go; i=1; while [ $i -lt 40 ]; do echo line $i; i=$((i+1)); done"
    job_id = cli.ok("start", "-i", "--", "sh", "-c", script).strip()
    expected = "".join(f"line {i}\n" for i in range(40)).encode()
    with subprocess.Popen(
        [JOBWORKER, "logs", "-f", "--", job_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env("alice"),
    ) as follower:
        try:
            assert follower.stdout is not None
            assert follower.stdout.readline() == b"line 0\n"
            assert cli.status(job_id)["state"] == "running"
            written = subprocess.run(
                [JOBWORKER, "write", "--", job_id],
                input=b"go\n",
                env=cli.env("alice"),
                capture_output=True,
                timeout=COMMAND_TIMEOUT_S,
            )
            assert written.returncode == 0, written.stderr
            rest, err = follower.communicate(timeout=COMMAND_TIMEOUT_S)
        finally:
            follower.kill()
    assert (follower.returncode, b"line 0\n" + rest, err) == (0, expected, b"")
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
        "containment", "output_bytes", "output_kept_bytes", "output_truncated", "pid", "user",
        "uid", "isolation", "node", "enforced",
    ]  # fmt: skip
    uid = status["uid"]  # the server runs as root: a uid of the job's own
    assert status["user"] == f"job-{uid}" and 61184 <= uid <= 65519
    assert status["isolation"] == f"namespaces, user job-{uid}({uid}), network private"
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
    assert missing.stderr.decode() == (
        "jobworker: NOT_FOUND: job 'no-such-job' not found (`jobworker list` shows the jobs"
        " you may see)\n"
    )
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
    assert result.stderr.decode() == (
        "jobworker: UNAVAILABLE: no jobworker server answers at 127.0.0.1:1 (is `jobworker"
        " serve` running? is JOBWORKER_SERVER right?)\n"
    )


def test_ctrl_c_stops_the_job_and_exits_130(cli: Cli) -> None:
    with subprocess.Popen(
        [*INTERRUPTIBLE, JOBWORKER, "run", "--", "sh", "-c", "echo started; exec sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env("alice"),
    ) as run:
        try:
            assert run.stdout is not None
            assert run.stdout.readline() == b"started\n"
            run.send_signal(signal.SIGINT)
            _, err = run.communicate(timeout=COMMAND_TIMEOUT_S)
        finally:
            run.kill()
    assert run.returncode == 130
    first, last = err.decode().splitlines()
    job_id = last.split()[-1]
    assert first == (
        f"jobworker: stopping job {job_id} (SIGTERM, SIGKILL after the server's grace"
        " period; Ctrl-C again to leave it running)"
    )
    assert last.startswith("jobworker: interrupted: stopped job ")
    status = cli.status(job_id)
    assert (status["reason"], status["stopped_by"]) == ("stopped", "alice")


def test_plugins_json_lists_authz() -> None:
    result = jobworker("plugins", "--json", "--plugin", "authz", env=clean_env())
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == ["authz", "isolation"]
    assert rows[1]["mode"].startswith("namespaces (pid, mount, ipc, uts, cgroup; network private)")
    assert "jobworker_isolate" in rows[1]["hooks"]
    assert isinstance(rows[0]["version"], str)
    assert "jobworker_authorize" in rows[0]["hooks"]
    every = json.loads(jobworker("plugins", "--json", env=clean_env()).stdout)
    assert {"authz", "audit-log", "cgroupv2"} <= {row["name"] for row in every}


def test_unknown_plugin_is_one_line_saying_how_to_install_it(pki: Pki) -> None:
    result = jobworker("serve", "--plugin", "no-such-plugin", *pki.server_args(), env=clean_env())
    assert result.returncode == 2
    line = result.stderr.decode()
    assert line.startswith(
        "jobworker: error: unknown plugin 'no-such-plugin': neither built in nor installed;"
        " install the package that provides it next to jobworker (`"
    )
    # jobworker's own interpreter, whatever its venv names it (tox's is `python`, venv's `python3`)
    interpreter, _, rest = line.split("`")[1].partition(" ")
    assert rest == "-m pip install PACKAGE" and os.access(interpreter, os.X_OK), line
    assert "; plugins are usually named jobworker-no-such-plugin) (available: authz, " in line
    assert result.stderr.count(b"\n") == 1
    assert result.stdout == b""


def test_a_typo_of_a_built_in_plugin_gets_a_suggestion(pki: Pki) -> None:
    result = jobworker("serve", "--plugin", "cgroup-v2", *pki.server_args(), env=clean_env())
    assert result.returncode == 2
    assert result.stderr.decode().startswith(
        "jobworker: error: unknown plugin 'cgroup-v2': did you mean 'cgroupv2'? (available:"
    )


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


def test_cut_output_makes_logs_and_run_exit_1_and_status_say_so(
    start_server: StartServer, pki: Pki, tmp_path: Path
) -> None:
    server = start_server(
        *pki.server_args(), f"--spool-dir={tmp_path / 'spool'}", "--max-output-bytes=64K"
    )
    env = pki.client_env("alice", server.address)
    run = jobworker("run", "--", "head", "-c", "1M", "/dev/zero", env=env)
    assert run.returncode == 1
    assert run.stdout == bytes(64 << 10)
    assert run.stderr.decode().startswith(
        f"jobworker: DATA_LOSS: the output was cut after {64 << 10} bytes kept"
    )
    job_id = jobworker("start", "--", "head", "-c", "1M", "/dev/zero", env=env).stdout
    job_id_text = job_id.decode().strip()
    logs = jobworker("logs", "-f", "--", job_id_text, env=env)
    assert (logs.returncode, len(logs.stdout)) == (1, 64 << 10)
    assert b"DATA_LOSS" in logs.stderr and logs.stderr.count(b"\n") == 1
    status = json.loads(jobworker("status", "--json", "--", job_id_text, env=env).stdout)
    assert status["output_truncated"] is True
    assert (status["output_bytes"], status["output_kept_bytes"]) == (1 << 20, 64 << 10)
    human = jobworker("status", "--", job_id_text, env=env).stdout.decode()
    assert re.search(r"^output_truncated: +yes$", human, re.M), human


def test_list_filters_and_ids_only(cli: Cli) -> None:
    done = cli.ok("start", "--", "true").strip()
    cli.ok("logs", "-f", done)
    running = cli.ok("start", "--", "sleep", "30").strip()
    try:
        ids = cli.ok("list", "-q", "--running").split()
        assert running in ids and done not in ids
        assert done in cli.ok("list", "-q", "--state", "exited").split()
        by_owner = json.loads(cli.ok("list", "--json", "--owner", "alice", as_="root"))
        assert {job["owner"] for job in by_owner} == {"alice"}
        clash = cli("list", "--running", "--state", "exited")
        assert clash.returncode == 2
        assert b"not allowed with argument" in clash.stderr
    finally:
        cli.ok("stop", "--grace", "0", running)


def test_a_server_without_port_is_dialled_on_50051(cli: Cli, pki: Pki) -> None:
    result = jobworker("list", env=pki.client_env("alice", "localhost"))
    assert result.stderr.decode() == (
        "jobworker: UNAVAILABLE: no jobworker server answers at localhost:50051 (is"
        " `jobworker serve` running? is JOBWORKER_SERVER right?)\n"
    )


def test_a_client_certificate_of_another_ca_is_named(cli: Cli, pki: Pki, tmp_path: Path) -> None:
    other = tmp_path / "other"
    env = clean_env(JOBWORKER_HOME=str(tmp_path / "home"))
    assert jobworker("certs", "init", "--dir", str(other), env=env).returncode == 0
    env = dict(cli.env("alice"), JOBWORKER_TLS_CERT=str(other / "admin.pem"))
    env["JOBWORKER_TLS_KEY"] = str(other / "admin-key.pem")
    result = jobworker("list", env=env)
    assert result.stderr.decode() == (
        f"jobworker: UNAVAILABLE: the server at {cli.server.address} closed the connection"
        " after the TLS handshake: it is busy (at its connection limit for this address; try"
        " again shortly), or it refused this client's certificate (--tls-cert,"
        " JOBWORKER_TLS_CERT, not signed by the server's CA, expired, or not a client"
        " certificate)\n"
    )
    env = dict(cli.env("alice"), JOBWORKER_TLS_CA=str(other / "ca.pem"))
    result = jobworker("list", env=env)
    assert result.stderr.decode() == (
        f"jobworker: UNAVAILABLE: the server at {cli.server.address} has a certificate this"
        " client does not trust: it is not signed by --tls-ca (JOBWORKER_TLS_CA), or does"
        " not name the host dialled (check the address, or the server's certificate"
        " names)\n"
    )


def test_command_options_without_dash_dash_get_a_suggestion() -> None:
    result = jobworker("run", "ls", "-l", "/", env=clean_env())
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "jobworker: error: unrecognized arguments: -l / (see 'jobworker --help'); put --"
        " before the command: jobworker run -- ls -l /\n"
    )


def test_an_empty_job_id_is_refused_in_cli_words() -> None:
    result = jobworker("logs", "", env=clean_env())
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "jobworker: error: argument JOB: the job id is empty: pass the id `jobworker start`"
        " printed (see `jobworker list`) (see 'jobworker logs --help')\n"
    )


def test_status_shows_booleans_and_empty_lists_plainly(cli: Cli) -> None:
    job_id = cli.ok("start", "--", "true").strip()
    cli.ok("logs", "-f", job_id)
    lines = dict(line.split(":", 1) for line in cli.ok("status", job_id).splitlines())
    assert lines["escalated"].strip() == "no"
    assert lines["limits.io"].strip() == "-"


def test_certs_init_help_lists_roles_in_words() -> None:
    result = jobworker("certs", "init", "--help", env=clean_env())
    assert b"ROLE is user or admin" in result.stdout
    assert b"('user'" not in result.stdout


def test_a_second_serve_on_a_busy_port_says_so_in_one_line(cli: Cli, pki: Pki) -> None:
    result = jobworker("serve", "--listen", cli.server.address, *pki.server_args(), env=clean_env())
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == (
        f"jobworker: error: {cli.server.address} is already in use (another jobworker"
        " serve?); pick another with --listen"
    )
    assert b"GRPC_VERBOSITY" not in result.stderr and b"Failed to bind" not in result.stderr


def test_plugins_lists_a_description_per_plugin() -> None:
    result = jobworker("plugins", env=clean_env())
    assert result.returncode == 0, result.stderr
    heads = {
        line.split()[0]: line.split(": ", 1)[1]
        for line in result.stdout.decode().splitlines()
        if not line.startswith(" ")
    }
    assert heads["cgroupv2"] == (
        "puts each job in a cgroup v2: CPU, memory, IO and pids limits, usage, tree-kill"
    )
    assert all(heads[name] for name in ("authz", "audit-log", "isolation"))
    # Descriptions written for people, not a class docstring's first line.
    assert heads["ray"] == (
        "runs jobs on the nodes of a Ray cluster (--ray-address; needs jobworker[ray])"
    )
    assert heads["metrics"] == (
        "Prometheus metrics of jobs and the server on --metrics-listen (mutual TLS with"
        " --metrics-tls; needs jobworker[metrics])"
    )


def test_a_second_ctrl_c_leaves_a_job_that_ignores_sigterm_running(cli: Cli) -> None:
    script = "trap '' TERM; echo started; exec sleep 60"
    with subprocess.Popen(
        [*INTERRUPTIBLE, JOBWORKER, "run", "--", "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env("alice"),
    ) as run:
        try:
            assert run.stdout is not None and run.stderr is not None
            assert run.stdout.readline() == b"started\n"
            run.send_signal(signal.SIGINT)
            first = run.stderr.readline().decode()
            assert first.startswith("jobworker: stopping job ")
            assert first.endswith("; Ctrl-C again to leave it running)\n")
            job_id = first.split()[3]
            run.send_signal(signal.SIGINT)
            second = time.monotonic()
            _, rest = run.communicate(timeout=COMMAND_TIMEOUT_S)
            left_after = time.monotonic() - second
        finally:
            run.kill()
    assert run.returncode == 130
    assert rest.decode() == (
        f"jobworker: left job {job_id} running (`jobworker stop {job_id}` stops it)\n"
    )
    assert left_after < 5  # not the server's 10 s grace period
    cli.ok("stop", "--grace", "0", job_id)

"""Job isolation, tried as a hostile user-role client: each attack through the real server.

The server's state (PKI with the CA key, whitelist, audit log, spool) lives outside /tmp,
where a real server keeps it, and is made world-readable and world-writable here, so that
only the isolation (not file permissions) stands between a job and it. After each attack
the server and the other client's job must still work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import grpc
import pytest

from jobworker.api.pki import PkiPaths, init_pki
from jobworker.backends.local.isolation import IsolationPlan
from jobworker.backends.local.manager import JobManager
from jobworker.backends.local.uids import DEFAULT_RANGE, UidRange
from jobworker.errors import ConfigError
from jobworker.hooks import hookimpl
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.model import JobStatus
from jobworker.plugins.authz import Authz
from jobworker.plugins.isolation import Isolation
from jobworker.v1 import jobworker_pb2 as pb
from tests.serverfixtures import (
    RPC_TIMEOUT_S,
    RunningServer,
    running_server,
    start_job,
    wait_exited,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switches jobs to nobody: needs root")

NOBODY = 65534
WHITELIST = """
[[clients]]
identity = "alice"
role = "user"

[[clients]]
identity = "bob"
role = "user"
run_as = ["nobody", "daemon"]

[[clients]]
identity = "root"
role = "admin"
run_as = ["nobody", "root", "no-such-account-here"]
"""


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    """Like /var/lib/jobworker: outside /tmp (which every job gets a private copy of)."""
    base = Path("/var/lib/jobworker-tests")
    base.mkdir(exist_ok=True)
    directory = Path(os.path.realpath(base / f"isolation-{os.getpid()}"))
    directory.mkdir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def pki(state_dir: Path) -> PkiPaths:
    paths = init_pki(
        state_dir / "pki", clients=[("alice", "user"), ("bob", "user"), ("root", "admin")]
    )
    paths.authz.write_text(WHITELIST)
    _open_to_everyone(state_dir / "pki")
    return paths


def _open_to_everyone(path: Path) -> None:
    """Take away the second wall (permissions) so the test sees the first (isolation)."""
    path.chmod(0o777)
    for child in path.iterdir():
        if child.name != "server-key.pem":  # the server refuses to load a readable key
            child.chmod(0o666)


def _options(pki: PkiPaths, audit_log: Path, spool: Path, **more: object) -> argparse.Namespace:
    return argparse.Namespace(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_ca=pki.ca_cert,
        tls_crl=None,
        authz=pki.authz,
        audit_log=audit_log,
        spool_dir=spool,
        **more,
    )


@pytest.fixture(scope="module")
def server(pki: PkiPaths, state_dir: Path) -> Iterator[RunningServer]:
    audit_log = state_dir / "log" / "audit.log"
    audit_log.parent.mkdir(mode=0o777)
    audit_log.write_text('{"event": "earlier record"}\n')
    audit_log.chmod(0o666)
    spool = state_dir / "spool"
    plugins = Plugins()
    plugins.register(Authz.from_file(pki.authz), name="authz")
    isolation = Isolation()
    isolation.jobworker_configure(_options(pki, audit_log, spool))
    plugins.register(isolation, name="isolation")
    plugins.load([])
    with running_server(pki, plugins=plugins, spool_dir=spool) as running:
        (state_dir / "spool").chmod(0o777)
        for run in (state_dir / "spool").iterdir():
            run.chmod(0o777)
        yield running


def run_sh(
    server: RunningServer, who: str, script: str, **fields: object
) -> tuple[pb.JobStatusResponse, str, str]:
    stub = server.stub(who)
    job_id = start_job(stub, "sh", "-c", script, **fields)
    out = b"".join(
        c.data
        for c in stub.StreamOutput(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        if c.stream == "stdout"
    )
    err = b"".join(
        c.data
        for c in stub.StreamOutput(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        if c.stream == "stderr"
    )
    status = stub.GetStatus(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
    return status, out.decode(errors="replace"), err.decode(errors="replace")


def attempts(
    server: RunningServer, who: str, tries: dict[str, str], **fields: object
) -> dict[str, str]:
    """Run each of ``tries`` (name: shell command) in one job, each in a subshell of its
    own; what came of each: "done" (exit status 0) or "refused".

    Every try must report, then a final marker: a script that stops early (a special
    built-in such as ``:`` exits a non-interactive shell when its redirection fails)
    fails the test here instead of passing on output that never came.
    """
    script = "".join(
        f"( {command} ) >/dev/null 2>&1 && echo 'done: {name}' || echo 'refused: {name}'; "
        for name, command in tries.items()
    )
    _, out, _ = run_sh(server, who, script + "echo all-tried", **fields)
    lines = out.splitlines()
    assert lines[-1:] == ["all-tried"], out
    outcome = {name: what for what, name in (line.split(": ", 1) for line in lines[:-1])}
    assert list(outcome) == list(tries), out
    return outcome


@pytest.fixture
def victim(server: RunningServer) -> Iterator[tuple[str, int]]:
    """A running job of bob's with a secret in its environment; (job id, host pid)."""
    stub = server.stub("bob")
    job_id = start_job(
        stub,
        "sh",
        "-c",
        "echo victim-alive; echo secret > /tmp/bob-file; exec sleep 600",
        env={"SECRET": "hunter2-bob"},
    )
    status = stub.GetStatus(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
    yield job_id, status.pid
    stub.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=1), timeout=RPC_TIMEOUT_S)


def assert_victim_unharmed(server: RunningServer, victim: tuple[str, int]) -> None:
    stub = server.stub("bob")
    status = stub.GetStatus(pb.JobRequest(job_id=victim[0]), timeout=RPC_TIMEOUT_S)
    assert status.status == "running"
    chunks = stub.StreamOutput(
        pb.JobRequest(job_id=victim[0], no_follow=True), timeout=RPC_TIMEOUT_S
    )
    assert b"".join(c.data for c in chunks) == b"victim-alive\n"


# -- the job itself -------------------------------------------------------------------------


def test_job_runs_as_a_uid_of_its_own_without_capabilities(server: RunningServer) -> None:
    status, out, _ = run_sh(
        server,
        "alice",
        "id -u; id -G; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status; echo HOME=$HOME USER=$USER",
    )
    lines = out.splitlines()
    uid = status.uid
    assert uid in UidRange.parse(DEFAULT_RANGE)
    assert lines[0] == str(uid)
    assert lines[1] == str(uid)  # a group of its own, nothing of root's
    caps = dict(line.split(":\t") for line in lines[2:8])
    assert caps == {
        "CapInh": "0000000000000000",
        "CapPrm": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapBnd": "0000000000000000",
        "CapAmb": "0000000000000000",
        "NoNewPrivs": "1",
    }
    assert lines[8] == f"HOME=/tmp USER=job-{uid}"
    assert status.user == f"job-{uid}"
    assert status.isolation == f"namespaces, user job-{uid}({uid}), network private"


def test_setuid_binary_does_not_raise_privileges(server: RunningServer, state_dir: Path) -> None:
    suid = state_dir / "suid-id"
    shutil.copy("/usr/bin/id", suid)
    os.chown(suid, 0, 0)
    suid.chmod(0o4755)
    assert suid.stat().st_mode & stat.S_ISUID
    status, out, _ = run_sh(server, "alice", f"{suid} -u; su -c id root </dev/null; echo su=$?")
    # The last line is the shell's own: both commands ran; su asked for a password on an
    # empty stdin and failed (1), rather than run id as root.
    assert out.splitlines() == [str(status.uid), "su=1"], out
    assert status.uid != 0


def test_sees_only_its_own_processes(server: RunningServer, victim: tuple[str, int]) -> None:
    _, out, _ = run_sh(server, "alice", "ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '")
    # Its PID 1 (the reaper), the shell, ls, grep, sort, tr: nothing of the host.
    pids = [int(p) for p in out.split()]
    assert max(pids) < 20, out
    assert victim[1] not in pids or victim[1] < 20


# -- the server's files ---------------------------------------------------------------------


def test_server_key_ca_key_whitelist_audit_log_and_spool_are_hidden(
    server: RunningServer, pki: PkiPaths, state_dir: Path, victim: tuple[str, int]
) -> None:
    [run] = (state_dir / "spool").iterdir()
    victim_out = run / f"{victim[0]}.out"
    victim_out.chmod(0o644)  # the second wall down: only the isolation hides it
    audit_log = state_dir / "log" / "audit.log"
    files = [pki.server_key, pki.ca_key, pki.authz, audit_log, victim_out]
    directories = [pki.directory, state_dir / "spool", run]
    for target in files + directories:
        assert target.exists()  # the host sees it, readable by anyone
    # A read or a listing counts only if it shows something: an empty file or directory
    # put over a path hides it.
    tries = {f"read {f}": f"cat {f} | grep -q ." for f in files}
    tries |= {f"list {d}": f"ls -A {d} | grep -q ." for d in directories}
    tries |= {
        "append to the whitelist": f"echo rogue >> {pki.authz}",
        "truncate the audit log": f": > {audit_log}",
        "list the working directory of PID 1": "ls -A /proc/1/cwd/ | grep -q .",
    }
    assert attempts(server, "alice", tries) == dict.fromkeys(tries, "refused")
    assert pki.authz.read_text() == WHITELIST
    assert audit_log.read_text() == '{"event": "earlier record"}\n'
    assert_victim_unharmed(server, victim)


# -- other jobs and the server process ------------------------------------------------------


def test_other_jobs_environment_processes_and_tmp_are_out_of_reach(
    server: RunningServer, victim: tuple[str, int]
) -> None:
    script = (
        "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c hunter2; "
        f"kill -9 {victim[1]} && echo KILLED; kill -9 -{victim[1]} && echo KILLED-GROUP; "
        "ls -A /tmp; echo mine > /tmp/alice-file && cat /tmp/alice-file; pwd"
    )
    _, out, _ = run_sh(server, "alice", script)
    assert out.splitlines() == ["0", "mine", "/tmp"]
    assert_victim_unharmed(server, victim)


def test_cannot_signal_the_server(server: RunningServer, victim: tuple[str, int]) -> None:
    server_pid = os.getpid()  # the test server runs in this process
    _, out, _ = run_sh(
        server, "alice", f"kill -9 {server_pid} && echo KILLED; kill -TERM -1; echo done"
    )
    assert out.splitlines() == ["done"]
    assert_victim_unharmed(server, victim)
    assert run_sh(server, "alice", "echo still serving")[1] == "still serving\n"


def test_cannot_write_any_cgroup(server: RunningServer) -> None:
    script = (
        "for f in /sys/fs/cgroup/cgroup.procs /sys/fs/cgroup/unified/cgroup.procs"
        " /sys/fs/cgroup/memory/cgroup.procs; do echo $$ > $f && echo MOVED $f; done;"
        " grep -c . /proc/self/mountinfo >/dev/null; cat /proc/self/cgroup | grep '^0::'"
    )
    _, out, _ = run_sh(server, "alice", script)
    assert "MOVED" not in out
    assert out.strip() == "0::/"  # its cgroup namespace: the host's tree is not even named


# -- network --------------------------------------------------------------------------------


def _connects(server: RunningServer, who: str, **fields: object) -> str:
    port = server.address.rsplit(":", 1)[1]
    script = (
        'python3 -c \'import socket; socket.create_connection(("127.0.0.1", '
        + port
        + "), timeout=5); print(\"connected\")' 2>&1 | tail -1; sed 1,2d /proc/net/dev | cut -d: -f1 | tr -d ' '"
    )
    return run_sh(server, who, script, **fields)[1]


def test_network_none_has_only_a_loopback(server: RunningServer) -> None:
    out = _connects(server, "alice", network="none")
    assert out.splitlines()[0].startswith("ConnectionRefusedError"), out
    assert out.splitlines()[1:] == ["lo"]
    # private, the default: its own loopback, where the server is not
    assert _connects(server, "alice").splitlines()[0].startswith("ConnectionRefusedError")


def test_unknown_network_is_invalid(server: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as info:
        start_job(server.stub("alice"), "true", network="bridge")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "network 'bridge' is not one of private, none, host" in info.value.details()


# -- accounts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "user", "code", "message"),
    [
        (
            "alice",
            "root",
            grpc.StatusCode.PERMISSION_DENIED,
            "'alice' may not run jobs as 'root'; allowed: none (each job runs as a uid of its own)",
        ),
        (
            "alice",
            "daemon",
            grpc.StatusCode.PERMISSION_DENIED,
            "'alice' may not run jobs as 'daemon'; allowed: none",
        ),
        ("bob", "root", grpc.StatusCode.PERMISSION_DENIED, "allowed: nobody, daemon"),
        (
            "root",
            "no-such-account-here",
            grpc.StatusCode.FAILED_PRECONDITION,
            "account 'no-such-account-here' does not exist",
        ),
    ],
)
def test_accounts_not_granted_are_refused(
    server: RunningServer, who: str, user: str, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        start_job(server.stub(who), "id", user=user)
    assert info.value.code() is code
    assert message in info.value.details()


def test_listed_accounts_are_used(server: RunningServer) -> None:
    status, out, _ = run_sh(server, "bob", "id -un", user="daemon")
    assert (out, status.user, status.uid) == ("daemon\n", "daemon", 1)
    status, out, _ = run_sh(server, "root", "id -u; grep CapEff /proc/self/status")
    assert out.splitlines()[0] == str(NOBODY)  # an admin's default is the first of its list
    status, out, _ = run_sh(server, "root", "id -u; grep CapEff /proc/self/status", user="root")
    assert out.splitlines()[0] == "0" and status.uid == 0  # root only where listed


# -- normal jobs keep working ---------------------------------------------------------------


def test_exit_codes_and_signals_come_through_pid1(server: RunningServer) -> None:
    status, _, _ = run_sh(server, "alice", "exit 7")
    assert (status.reason, status.exit_code, status.signal) == ("exited", 7, 0)
    status, _, _ = run_sh(server, "alice", "kill -TERM $$")
    assert (status.reason, status.exit_code, status.signal) == ("signaled", 128 + 15, 15)


def test_stop_reaches_the_tree_and_sigterm_is_enough(server: RunningServer) -> None:
    stub = server.stub("alice")
    job_id = start_job(stub, "sh", "-c", "setsid sleep 600 & sleep 600")
    reply = stub.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=5), timeout=RPC_TIMEOUT_S)
    assert reply.success and not reply.status.escalated
    assert reply.status.reason == "stopped"


def test_stop_of_a_term_ignoring_job_is_bounded(server: RunningServer) -> None:
    stub = server.stub("alice")
    job_id = start_job(
        stub,
        "sh",
        "-c",
        "trap '' TERM; setsid sh -c \"trap '' TERM; sleep 600\" & echo armed; sleep 600",
    )
    first = next(iter(stub.StreamOutput(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)))
    assert first.data == b"armed\n"  # the traps are set: SIGTERM alone cannot end it
    began = time.monotonic()
    reply = stub.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=1), timeout=RPC_TIMEOUT_S)
    assert reply.status.escalated and reply.status.signal == signal.SIGKILL
    assert time.monotonic() - began < 1 + 5
    assert wait_exited(stub, job_id).status == "exited"


def test_quiet_network_none_job_reports_cleanly(server: RunningServer) -> None:
    status, out, _ = run_sh(
        server, "alice", "cat /etc/hostname >/dev/null; echo ok", network="none"
    )
    assert out == "ok\n" and status.exit_code == 0
    assert status.isolation.endswith("network none")


# -- a server that is not root: user namespaces -----------------------------------------

UNPRIVILEGED_SERVER = """
import asyncio, sys
from pathlib import Path
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from jobworker.plugins.isolation import Isolation
from jobworker.hooks.host import Plugins
from jobworker.backends.local.manager import JobManager
from jobworker.jobspec import JobSpec
from jobworker.backends.local.spawn import Spawner

async def main(state, zygote):
    plugins = Plugins()
    # As root this forces what a server that is not root does on its own.
    plugins.register(Isolation(hide=(state + "/pki",), user_namespace=True), "isolation")
    manager = JobManager(plugins, Path(state) / "spool")
    manager._spawner = Spawner(use_zygote=zygote == "zygote")
    try:
        script = (
            f"id -u; grep CapEff /proc/self/status; cat {state}/pki/ca-key.pem;"
            " set -- /proc/[0-9]*; echo $#; echo x > /etc/jobworker-test || echo ro"
        )
        job = await manager.start(JobSpec("sh", ("-c", script)), "alice")
        out = b"".join([c.data async for c in manager.follow(job.job_id) if c.stream == 1])
        final = await manager.wait(job.job_id)
        print(job.isolation, final.exit.exit_code, sep="\\n")
        sys.stdout.write(out.decode())
    finally:
        await manager.shutdown()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize("path", ["zygote", "launcher"])
def test_server_that_is_not_root_hides_its_files_in_a_user_namespace(
    path: str, job_tmp_path: Path
) -> None:
    """The Quickstart as a normal user: the dev PKI in its home is readable by the server's
    uid, which the job shares outside its user namespace; the mount namespace hides it.

    Run as nobody where nobody can execute this interpreter; where it cannot (CI's Python
    lives in root's 0700 home), the same code path runs as root with user namespaces forced.
    """
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = "import os, sys; sys.exit(not os.access(sys.executable, os.X_OK))"
    as_nobody = subprocess.run([*drop, sys.executable, "-c", probe], check=False).returncode == 0
    (job_tmp_path / "pki").mkdir()
    (job_tmp_path / "pki" / "ca-key.pem").write_text("PRIVATE KEY\n")
    (job_tmp_path / "pki" / "ca-key.pem").chmod(0o644)
    (job_tmp_path / "spool").mkdir()
    if as_nobody:
        subprocess.run(["chown", "-R", "65534:65534", str(job_tmp_path)], check=True)
    args = [str(job_tmp_path), path]
    result = subprocess.run(
        [*(drop if as_nobody else []), sys.executable, "-c", UNPRIVILEGED_SERVER, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    lines = result.stdout.splitlines()
    owner = "nobody(65534)" if as_nobody else "root(0)"
    assert lines[:2] == [f"user namespace, user {owner}, network private", "0"], result
    # nobody inside, no capabilities, only its own PID 1 and sh (the shell's glob counts
    # them, with no child racing it), a read-only host.
    assert lines[2:] == ["65534", "CapEff:\t0000000000000000", "2", "ro"], result
    assert "PRIVATE KEY" not in result.stdout


# -- a third-party plugin on the same hook; --no-isolation; failing closed ------------------


class NicePlugin:
    """What a seccomp/Landlock/AppArmor plugin does: an exec wrapper, one more hidden path."""

    def __init__(self, hide: str) -> None:
        self.hide = hide

    @hookimpl
    def jobworker_isolate(self, plan: IsolationPlan | None) -> IsolationPlan | None:
        assert plan is not None  # the built-in plugin ran first
        return attrs.evolve(
            plan, wrapper=("/usr/bin/nice", "-n", "7"), hide=(*plan.hide, self.hide)
        )


def run_with(plugins: Plugins, script: str, spool: Path) -> tuple[str, JobStatus]:
    async def body() -> tuple[str, JobStatus]:
        manager = JobManager(plugins, spool)
        try:
            job = await manager.start(JobSpec("sh", ("-c", script)), "alice")
            out = b"".join([c.data async for c in manager.follow(job.job_id)])
            return out.decode(), await manager.wait(job.job_id)
        finally:
            await manager.shutdown()

    return asyncio.run(asyncio.wait_for(body(), 60))


def test_a_third_party_plugin_wraps_the_command_and_hides_more(
    job_tmp_path: Path, tmp_path: Path
) -> None:
    secret = job_tmp_path / "plugin-secret"
    secret.write_text("plugin secret\n")
    secret.chmod(0o644)
    plugins = Plugins()
    plugins.register(Isolation(), name="isolation")
    plugins.register(NicePlugin(str(secret)), name="nice")
    plugins.load([])
    out, status = run_with(plugins, f"nice; id -u; cat {secret}", tmp_path)
    # Under the wrapper, still unprivileged; the file reads as empty (/dev/null over it).
    # `nice -n 7` adds to the niceness the job inherits (a suite run under `nice`).
    niceness = min(os.getpriority(os.PRIO_PROCESS, 0) + 7, 19)
    assert out.splitlines() == [str(niceness), str(status.uid)]
    assert status.uid in UidRange.parse(DEFAULT_RANGE)
    assert status.exit is not None and status.exit.exit_code == 0


def test_no_isolation_runs_jobs_as_the_server_and_says_so(tmp_path: Path) -> None:
    plugins = Plugins()
    isolation = Isolation()
    isolation.jobworker_configure(argparse.Namespace(no_isolation=True))
    plugins.register(isolation, name="isolation")
    out, status = run_with(plugins, "id -u", tmp_path)
    assert out == f"{os.getuid()}\n"
    assert (status.isolation, status.user, status.uid) == ("none", None, os.getuid())
    assert isolation.mode.startswith("off (--no-isolation)")


def test_without_user_namespaces_a_server_that_is_not_root_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel boundary (no user namespaces) cannot be reached from a root test: fake it.
    monkeypatch.setattr("jobworker.plugins.isolation.user_namespaces_available", lambda: False)
    isolation = Isolation(user_namespace=True)
    with pytest.raises(ConfigError, match="cannot isolate jobs: the server is not root"):
        isolation.jobworker_configure(argparse.Namespace())
    Isolation(user_namespace=True).jobworker_configure(argparse.Namespace(no_isolation=True))


def test_a_uid_range_holding_an_account_is_refused_at_start_up() -> None:
    with pytest.raises(
        ConfigError,
        match=r"--job-uid-range 65000-65534 holds accounts of this host \(nobody\(65534\)\)",
    ):
        Isolation().jobworker_configure(
            argparse.Namespace(job_uid_range=UidRange.parse("65000-65534"))
        )


def test_job_user_root_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match="--job-user must not be root"):
        Isolation().jobworker_configure(argparse.Namespace(job_user="root"))
    with pytest.raises(ConfigError, match="no such account"):
        Isolation().jobworker_configure(argparse.Namespace(job_user="no-such-account-here"))

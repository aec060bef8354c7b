"""Who may do what, for every RPC: users, another user's job, admins, strangers.

alice and bob are users, root is an admin, mallory has a certificate of the same CA but
is not on the whitelist.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest

from jobworker.api.identity import Identity
from jobworker.errors import ConfigError, NotFound, PermissionDenied, job_not_found
from jobworker.jobspec import JobSpec
from jobworker.model import Action, JobState, JobStatus, new_job_id
from jobworker.plugins.authz import Authz, Role
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.serverfixtures import RPC_TIMEOUT_S, RunningServer, start_job

T = RPC_TIMEOUT_S
#: The RPCs about one job, authorized against its owner.
JOB_RPCS = ("GetStatus", "GetUsage", "StreamOutput", "StopJob", "WriteInput")
#: The RPCs about no job in particular, authorized by role alone.
CALLER_RPCS = ("StartJob", "ListJobs", "ListUsage")
SERVICE = pb.DESCRIPTOR.services_by_name["JobService"]
#: What alice's job writes first, then it echoes its stdin.
JOB_SCRIPT = "echo mine; exec cat"
INPUT = b"typed\n"


def call_rpc(stub: pb_grpc.JobServiceStub, rpc: str, job_id: str) -> Any:
    """Call ``rpc`` (about ``job_id`` if it is about a job): StopJob with a short grace,
    StreamOutput up to what is spooled, WriteInput a line without closing stdin."""
    calls: dict[str, Callable[[], Any]] = {
        "GetStatus": lambda: stub.GetStatus(pb.JobRequest(job_id=job_id), timeout=T),
        "GetUsage": lambda: stub.GetUsage(pb.UsageRequest(job_id=job_id), timeout=T),
        "StreamOutput": lambda: list(
            stub.StreamOutput(pb.JobRequest(job_id=job_id, no_follow=True), timeout=T)
        ),
        "StopJob": lambda: stub.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=1), timeout=T),
        "WriteInput": lambda: stub.WriteInput(
            iter([pb.InputChunk(job_id=job_id), pb.InputChunk(data=INPUT)]), timeout=T
        ),
        "StartJob": lambda: stub.StartJob(pb.StartJobRequest(command="true"), timeout=T),
        "ListJobs": lambda: stub.ListJobs(pb.ListJobsRequest(), timeout=T),
        "ListUsage": lambda: stub.ListUsage(pb.ListUsageRequest(), timeout=T),
    }
    return calls[rpc]()


def test_the_matrix_covers_every_rpc_of_the_service() -> None:
    """A new RPC fails here until it has a row in this matrix (and a call above)."""
    assert sorted(JOB_RPCS + CALLER_RPCS) == sorted(m.name for m in SERVICE.methods)


def refusal(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@pytest.fixture
def alice_job(api_server: RunningServer) -> Iterator[str]:
    """A running job of alice's that has written its line, stopped at the end by the admin."""
    alice = api_server.stub("alice")
    job_id = start_job(alice, "sh", "-c", JOB_SCRIPT, stdin=True)
    stream = alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=T)
    next(stream)
    stream.cancel()
    yield job_id
    api_server.stub("root").StopJob(pb.JobRequest(job_id=job_id, grace_seconds=1), timeout=T)


def is_running(server: RunningServer, job_id: str) -> bool:
    status = server.stub("root").GetStatus(pb.JobRequest(job_id=job_id), timeout=T)
    return bool(status.status == "running")


def served_output(server: RunningServer, job_id: str) -> bytes:
    """The job's output once it has echoed :data:`INPUT`."""
    out = b""
    for chunk in server.stub("root").StreamOutput(pb.JobRequest(job_id=job_id), timeout=T):
        out += chunk.data
        if out.endswith(INPUT):
            break
    return out


def assert_served(server: RunningServer, reply: Any, rpc: str, job_id: str, by: str) -> None:
    """What a permitted call about alice's job answers: her job, its output, its stop."""
    if rpc == "GetStatus":
        assert (reply.job_id, reply.owner, reply.status) == (job_id, "alice", "running")
        assert (reply.command, list(reply.args)) == ("sh", ["-c", JOB_SCRIPT])
    elif rpc == "StreamOutput":
        assert [(c.stream, c.data) for c in reply] == [("stdout", b"mine\n")]
    elif rpc == "GetUsage":
        assert reply.job_id == job_id and reply.source in ("proc", "cgroupv2", "")
    elif rpc == "WriteInput":
        assert (reply.bytes_written, reply.closed) == (len(INPUT), False)
        assert served_output(server, job_id) == b"mine\n" + INPUT  # it reached the job
    else:
        assert reply.success and not reply.already_finished
        status = reply.status
        assert (status.job_id, status.owner, status.status) == (job_id, "alice", "exited")
        assert (status.reason, status.stopped_by) == ("stopped", by)


@pytest.mark.parametrize("rpc", JOB_RPCS)
def test_user_may_use_own_job(api_server: RunningServer, alice_job: str, rpc: str) -> None:
    reply = call_rpc(api_server.stub("alice"), rpc, alice_job)
    assert_served(api_server, reply, rpc, alice_job, by="alice")


@pytest.mark.parametrize("rpc", JOB_RPCS)
def test_user_sees_other_users_job_as_unknown(
    api_server: RunningServer, alice_job: str, rpc: str
) -> None:
    bob = api_server.stub("bob")
    unknown = new_job_id()
    code, message = refusal(lambda: call_rpc(bob, rpc, alice_job))
    unknown_code, unknown_message = refusal(lambda: call_rpc(bob, rpc, unknown))
    assert code == unknown_code == grpc.StatusCode.NOT_FOUND
    assert message.replace(alice_job, "ID") == unknown_message.replace(unknown, "ID")
    assert is_running(api_server, alice_job)


@pytest.mark.parametrize("rpc", JOB_RPCS)
def test_admin_may_use_any_job(api_server: RunningServer, alice_job: str, rpc: str) -> None:
    reply = call_rpc(api_server.stub("root"), rpc, alice_job)
    assert_served(api_server, reply, rpc, alice_job, by="root")


def test_admin_stop_is_recorded(api_server: RunningServer, alice_job: str) -> None:
    reply = api_server.stub("root").StopJob(pb.JobRequest(job_id=alice_job), timeout=T)
    assert reply.success
    assert (reply.status.owner, reply.status.stopped_by) == ("alice", "root")


def test_list_shows_users_only_their_jobs_and_admins_all(
    api_server: RunningServer, alice_job: str
) -> None:
    bob_job = start_job(api_server.stub("bob"), "true")

    def listed(name: str) -> dict[str, str]:
        jobs = api_server.stub(name).ListJobs(pb.ListJobsRequest(), timeout=T).jobs
        return {job.job_id: job.owner for job in jobs}

    assert alice_job in listed("alice") and bob_job not in listed("alice")
    assert set(listed("alice").values()) == {"alice"}
    assert bob_job in listed("bob") and alice_job not in listed("bob")
    assert {alice_job, bob_job} <= set(listed("root"))


def test_list_usage_shows_users_only_their_running_jobs(
    api_server: RunningServer, alice_job: str
) -> None:
    bob_job = start_job(api_server.stub("bob"), "sleep", "60")
    try:

        def usage(name: str) -> set[str]:
            reply = api_server.stub(name).ListUsage(pb.ListUsageRequest(last=2), timeout=T)
            assert all(len(job.samples) <= 2 for job in reply.jobs)
            return {job.job_id for job in reply.jobs}

        assert alice_job in usage("alice") and bob_job not in usage("alice")
        assert bob_job in usage("bob") and alice_job not in usage("bob")
        assert {alice_job, bob_job} <= usage("root")
    finally:
        api_server.stub("bob").StopJob(pb.JobRequest(job_id=bob_job, grace_seconds=0), timeout=T)


def test_users_and_admins_may_start(api_server: RunningServer) -> None:
    for name in ("alice", "bob", "root"):
        assert start_job(api_server.stub(name), "true")


@pytest.mark.parametrize("job", ["existing", "unknown", "malformed"])
def test_not_whitelisted_is_denied_every_rpc(
    api_server: RunningServer, alice_job: str, job: str
) -> None:
    mallory = api_server.stub("mallory")
    job_id = {"existing": alice_job, "unknown": new_job_id(), "malformed": "../x"}[job]
    for method in SERVICE.methods:
        code, message = refusal(functools.partial(call_rpc, mallory, method.name, job_id))
        assert code == grpc.StatusCode.PERMISSION_DENIED, method.name
        assert message == "mallory is not on the authorization whitelist", method.name
    assert is_running(api_server, alice_job)


# -- the whitelist itself ------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "authz.toml"
    path.write_text(text)
    return path


def test_identity_matches_common_name_or_any_san(tmp_path: Path) -> None:
    authz = Authz.from_file(
        write(
            tmp_path,
            '[[clients]]\nidentity = "ci.example.com"\nrole = "admin"\n'
            '[[clients]]\nidentity = "alice"\nrole = "user"\n',
        )
    )
    assert authz.role_of(Identity("ci-runner", sans=("spiffe://x", "ci.example.com"))) is Role.ADMIN
    assert authz.role_of(Identity("alice")) is Role.USER
    assert authz.role_of(Identity("eve", sans=("alice.example.com",))) is None
    assert authz.path == tmp_path / "authz.toml"


def test_user_rules(tmp_path: Path) -> None:
    authz = Authz.from_file(write(tmp_path, '[[clients]]\nidentity = "bob"\nrole = "user"\n'))
    job_id = new_job_id()
    alices = JobStatus(
        job_id=job_id,
        spec=JobSpec("true"),
        owner="alice",
        state=JobState.RUNNING,
        pid=1,
        started_at=0.0,
        containment="process-group",
    )
    bob = Identity("bob")
    assert authz.authorize(bob, Action.START, None) is True
    assert authz.authorize(bob, Action.STATUS, None) is True  # unknown id: NOT_FOUND later
    assert authz.authorize(bob, Action.STATUS, attrs.evolve(alices, owner="bob")) is True
    with pytest.raises(NotFound) as hidden:
        authz.authorize(bob, Action.STOP, alices)
    assert str(hidden.value) == str(job_not_found(job_id))
    with pytest.raises(PermissionDenied, match="eve is not on the authorization whitelist"):
        authz.authorize(Identity("eve"), Action.LIST, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "",
            'lists no clients, so nobody could call the server: add [[clients]] entries with identity = "NAME" and role = "user" or "admin"',
        ),
        ("clients = []\n", "lists no clients"),
        (
            '[[clients]]\nidentity = "a"\nrole = "root"\n',
            "entry 1 ('a'): role 'root' is not one of 'user', 'admin'",
        ),
        (
            "clients = [1]\n",
            "clients entry 1 is not a table: write [[clients]] then identity and role",
        ),
        ('[[clients]]\nidentity = ""\nrole = "user"\n', "entry 1: identity must be"),
        ('[[clients]]\nidentity = "a"\nrol = "user"\n', "unknown key 'rol'"),
        (
            '[[clients]]\nidentity = "a"\nrole = "user"\n[[clients]]\nidentity = "a"\nrole = "admin"\n',
            "entry 2: identity 'a' is listed twice",
        ),
        ("[[clients]\n", "is not valid TOML"),
        ('[[client]]\nidentity = "a"\nrole = "user"\n', "unknown key 'client'"),
    ],
)
def test_bad_whitelist_refuses_start_up(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Authz.from_file(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_whitelist_refuses_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Authz.from_file(tmp_path / "nope.toml")


def test_unreadable_whitelist_refuses_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Authz.from_file(tmp_path)  # a directory: readable by no one, root included
    assert str(info.value) == f"cannot read authorization whitelist {tmp_path}: Is a directory"


def test_the_plugin_uses_the_whitelist_it_was_configured_with(tmp_path: Path) -> None:
    """What ``--authz FILE`` does: a fresh plugin denies everything until configured."""
    plugin = Authz()
    with pytest.raises(PermissionDenied, match="whitelist is not loaded"):
        plugin.authorize(Identity("bob"), Action.LIST, None)
    path = write(tmp_path, '[[clients]]\nidentity = "bob"\nrole = "user"\n')
    plugin.jobworker_configure(argparse.Namespace(authz=str(path)))
    assert plugin.role_of(Identity("bob")) is Role.USER
    assert plugin.authorize(Identity("bob"), Action.LIST, None) is True
    with pytest.raises(PermissionDenied, match="eve is not on the authorization whitelist"):
        plugin.authorize(Identity("eve"), Action.LIST, None)

"""Hostile client certificates against a real server: names with control characters, CA
certificates, the wrong key usage, and ownership bound to the whitelisted name that
matched. Real mTLS on 127.0.0.1, real processes."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator

import grpc
import pytest
import structlog
from cryptography import x509

from jobworker.api.pki import PkiPaths, init_pki
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.hostilecerts import SERVER_AUTH, mint_client
from tests.serverfixtures import (
    RPC_TIMEOUT_S,
    RunningServer,
    client_credentials,
    running_server,
    start_job,
)

T = RPC_TIMEOUT_S
WHITELIST = """
[[clients]]
identity = "alice"
role = "user"

[[clients]]
identity = "bob"
role = "user"
run_as = ["nobody", "daemon"]

[[clients]]
identity = "ops"
role = "admin"

[[clients]]
identity = "spiffe://corp/ci"
role = "user"

[[clients]]
identity = "10.0.0.1"
role = "admin"
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    paths = init_pki(tmp_path_factory.mktemp("hostile-pki"), clients=[("alice", "user")])
    paths.authz.write_text(WHITELIST)
    return paths


@pytest.fixture(scope="module")
def server(pki: PkiPaths) -> Iterator[RunningServer]:
    with running_server(pki) as running:
        yield running


def stub_for(server: RunningServer, file_name: str, **cert: object) -> pb_grpc.JobServiceStub:
    files = mint_client(server.pki, file_name, **cert)
    return pb_grpc.JobServiceStub(server.channel(credentials=client_credentials(files)))


def dns(name: str) -> x509.GeneralName:
    return x509.DNSName(name)


def refused_code(stub: pb_grpc.JobServiceStub) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        stub.ListJobs(pb.ListJobsRequest(), timeout=T)
    return refused.value.code(), refused.value.details()


@pytest.mark.parametrize(
    ("label", "cert"),
    [
        ("nul-in-cn", {"common_names": ["ops\0evil"]}),
        ("nul-in-dns-san", {"common_names": ["mallory"], "sans": [dns("ops\0evil")]}),
        ("nul-in-uri-san", {"sans": [x509.UniformResourceIdentifier("spiffe://corp/ci\0x")]}),
        ("escape-in-cn", {"common_names": ["ops\x1b]0;owned\x07"]}),
        ("newline-in-email", {"common_names": ["alice"], "sans": [x509.RFC822Name("a\n@b")]}),
    ],
)
def test_a_name_with_a_control_character_is_unauthenticated(
    server: RunningServer, label: str, cert: dict[str, object]
) -> None:
    stub = stub_for(server, f"hostile-{label}", **cert)
    with structlog.testing.capture_logs() as logs:
        code, message = refused_code(stub)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "control character" in message
    assert "\0" not in message and "\x1b" not in message
    assert any(e["event"] == "rpc_unauthenticated" for e in logs)


def test_a_ca_certificate_is_not_a_client(server: RunningServer) -> None:
    stub = stub_for(server, "hostile-ca", common_names=["ops"], ca=True)
    code, message = refused_code(stub)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "CA:TRUE" in message


def test_extended_key_usage_must_allow_client_auth(server: RunningServer) -> None:
    server_only = stub_for(server, "hostile-eku", common_names=["ops"], usages=[SERVER_AUTH])
    code, message = refused_code(server_only)
    # grpc's TLS library (1.85) already refuses it at the handshake; the server checks
    # again for every RPC in case a TLS library does not (tests/unit/test_identity.py).
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    assert "clientAuth" in message or code == grpc.StatusCode.UNAVAILABLE
    # Without the extension a certificate may be used for anything (RFC 5280).
    no_eku = stub_for(server, "no-eku", common_names=["alice"], usages=None)
    no_eku.ListJobs(pb.ListJobsRequest(), timeout=T)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches a job's account")
def test_run_as_comes_from_the_same_entry(server: RunningServer) -> None:
    as_bob = stub_for(server, "mallory-bob-run-as", common_names=["mallory"], sans=[dns("bob")])
    job_id = start_job(as_bob, "true", user="daemon")
    assert as_bob.GetStatus(pb.JobRequest(job_id=job_id), timeout=T).user == "daemon"
    as_alice = stub_for(server, "alice-run-as", common_names=["alice"], sans=[dns("bob")])
    with pytest.raises(grpc.RpcError) as refused:
        start_job(as_alice, "true", user="daemon")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_ownership_follows_the_name_that_gave_the_role(server: RunningServer) -> None:
    as_ops = stub_for(server, "mallory-ops", common_names=["mallory"], sans=[dns("ops")])
    as_bob = stub_for(server, "mallory-bob", common_names=["mallory"], sans=[dns("bob")])
    admin_job = start_job(as_ops, "sleep", "600")
    assert as_ops.GetStatus(pb.JobRequest(job_id=admin_job), timeout=T).owner == "ops"
    with pytest.raises(grpc.RpcError) as hidden:
        as_bob.StopJob(pb.JobRequest(job_id=admin_job, grace_seconds=0), timeout=T)
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    assert admin_job not in {j.job_id for j in as_bob.ListJobs(pb.ListJobsRequest()).jobs}
    # What mallory starts as bob is bob's: the real bob sees it as his own.
    bobs_job = start_job(as_bob, "sleep", "600")
    status = as_bob.GetStatus(pb.JobRequest(job_id=bobs_job), timeout=T)
    assert status.owner == "bob"
    as_ops.StopJob(pb.JobRequest(job_id=admin_job, grace_seconds=0), timeout=T)
    as_ops.StopJob(pb.JobRequest(job_id=bobs_job, grace_seconds=0), timeout=T)


@pytest.mark.parametrize(
    ("label", "common_names", "sans", "principal", "admin"),
    [
        ("cn-only", ["alice"], [], "alice", False),
        ("cn-unlisted-san-user", ["mallory"], [dns("bob")], "bob", False),
        ("cn-unlisted-san-admin", ["mallory"], [dns("ops")], "ops", True),
        ("cn-listed-wins", ["bob"], [dns("ops")], "bob", False),
        (
            "san-order",
            [],
            [x509.UniformResourceIdentifier("spiffe://corp/ci"), dns("ops")],
            "spiffe://corp/ci",
            False,
        ),
        ("email-san", ["mallory"], [x509.RFC822Name("ops")], "ops", True),
        (
            "ip-is-no-name",
            ["mallory"],
            [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))],
            None,
            False,
        ),
    ],
)
def test_matching_matrix(
    server: RunningServer,
    label: str,
    common_names: list[str],
    sans: list[x509.GeneralName],
    principal: str | None,
    admin: bool,
) -> None:
    alice = server.stub("alice")
    alices_job = start_job(alice, "true")
    stub = stub_for(server, f"matrix-{label}", common_names=common_names, sans=sans)
    if principal is None:
        code, _ = refused_code(stub)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        return
    job_id = start_job(stub, "true")
    assert stub.GetStatus(pb.JobRequest(job_id=job_id), timeout=T).owner == principal
    if admin or principal == "alice":
        stub.GetStatus(pb.JobRequest(job_id=alices_job), timeout=T)
    else:
        with pytest.raises(grpc.RpcError) as hidden:
            stub.GetStatus(pb.JobRequest(job_id=alices_job), timeout=T)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND

"""The job server itself (not a probe server) refuses bad peers at the TLS handshake."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from jobworker.api.pki import PkiPaths, make_ca
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1.jobworker_pb2_grpc import JobServiceStub
from tests.serverfixtures import RunningServer
from tests.tlsfixtures import add_client, raw_channel_credentials


def s_client(address: str, pki: PkiPaths, version: str) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl binary is not installed")
    files = pki.client("alice")
    result = subprocess.run(
        [
            *(openssl, "s_client", "-brief", "-connect", address, version, "-alpn", "h2"),
            *("-cert", str(files.cert), "-key", str(files.key), "-CAfile", str(files.ca)),
        ],
        input="",
        capture_output=True,
        text=True,
        errors="replace",
        timeout=20,
        check=False,
    )
    return result.stdout + result.stderr


def test_tls12_refused_tls13_accepted(api_server: RunningServer) -> None:
    assert "Protocol version: TLSv1.3" in s_client(api_server.address, api_server.pki, "-tls1_3")
    refused = s_client(api_server.address, api_server.pki, "-tls1_2")
    assert "Protocol version" not in refused
    assert ":error:" in refused  # the server hung up mid-handshake


def _unavailable(api_server: RunningServer, credentials: grpc.ChannelCredentials) -> None:
    channel = api_server.channel(credentials=credentials)
    with pytest.raises(grpc.RpcError) as err:
        JobServiceStub(channel).ListJobs(pb.ListJobsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_foreign_ca_refused(api_server: RunningServer) -> None:
    # Same CA name as ours, different key: only the signature tells them apart.
    mallory = add_client(api_server.pki, "forged-alice", ca=make_ca("jobworker dev CA"))
    _unavailable(api_server, raw_channel_credentials(mallory))


def test_expired_certificate_refused(api_server: RunningServer) -> None:
    now = datetime.now(UTC)
    old = add_client(
        api_server.pki,
        "expired-alice",
        not_before=now - timedelta(30),
        not_after=now - timedelta(1),
    )
    _unavailable(api_server, raw_channel_credentials(old))

"""Job output through each node agent's own port (jobworker/backends/ray/outputport.py):
byte-exact and resumable through the front, several followers at once, and a port that
serves only the front servers it pinned."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import grpc
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from jobworker.backends.ray.outputport import AGENT_NAME, FRONT_NAME, SERVICE, SelfSigned
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.ray_cluster.cluster import RAY_ENV, LocalCluster
from tests.ray_cluster.conftest import Front, RayToken, StartFront
from tests.ray_cluster.test_cluster_security import CONNECT_PROBE, _run_python
from tests.serverfixtures import start_job

RPC_TIMEOUT_S = 120
MiB = 1 << 20
#: Random bytes on stdout, their SHA-256 on stderr.
RANDOM_WITH_HASH = (
    'f=$(mktemp); head -c {size} /dev/urandom > "$f"; cat "$f"; sha256sum < "$f" >&2; rm "$f"'
)

#: A Ray driver with the cluster's token, as a front is: it asks the agent of node
#: ``argv[2]`` for its output port, pinning the certificate on stdin.
ASK_PORT = r"""
import json, sys
import ray
from jobworker.backends.ray.agent import NAMESPACE, agent_name
ray.init(address=sys.argv[1], namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
node = next(n for n in ray.nodes() if n["Alive"] and n.get("NodeName") == sys.argv[2])
agent = ray.get_actor(agent_name(node["NodeID"]), namespace=NAMESPACE)
info = ray.get(agent.output_port.remote(sys.stdin.buffer.read()))
print(json.dumps({"address": info.address, "cert": info.cert_pem.decode()}))
"""


def _streams(
    stub: pb_grpc.JobServiceStub, job_id: str, **fields: object
) -> list[pb.JobOutputChunk]:
    return list(stub.StreamOutput(pb.JobRequest(job_id=job_id, **fields), timeout=RPC_TIMEOUT_S))


def _stdout(chunks: list[pb.JobOutputChunk]) -> bytes:
    return b"".join(c.data for c in chunks if c.stream == "stdout")


def _random_job(stub: pb_grpc.JobServiceStub, size: int) -> str:
    return start_job(stub, "sh", "-c", RANDOM_WITH_HASH.format(size=size), node="w1")


def _hash_line(chunks: list[pb.JobOutputChunk]) -> str:
    stderr = b"".join(c.data for c in chunks if c.stream == "stderr")
    return stderr.decode().split()[0]


def test_random_output_is_byte_exact_through_the_port_and_resumes_from_the_middle(
    front: Front,
) -> None:
    alice = front.stub("alice")
    size = 20 * MiB
    job_id = _random_job(alice, size)
    chunks = _streams(alice, job_id)
    data = _stdout(chunks)
    assert len(data) == size, [c.data[:300] for c in chunks if c.stream == "stderr"]
    assert hashlib.sha256(data).hexdigest() == _hash_line(chunks)
    # Resumed from the chunk in the middle: exactly the rest, nothing lost or repeated
    # (cut into chunks of other sizes: each follower's grow as it keeps up).
    middle = len(chunks) // 2
    assert middle > 4, len(chunks)
    rest = _streams(alice, job_id, offset=chunks[middle].offset, no_follow=True)
    assert _stdout(chunks[: middle + 1]) + _stdout(rest) == data
    assert _hash_line(rest) == _hash_line(chunks)
    assert rest[-1].offset == chunks[-1].offset
    # An offset that is not a chunk boundary is the agent's INVALID_ARGUMENT, relayed.
    with pytest.raises(grpc.RpcError) as refused:
        _streams(alice, job_id, offset=chunks[middle].offset + 1)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a chunk boundary" in (refused.value.details() or "")


def test_four_followers_of_a_running_job_get_the_same_bytes(front: Front) -> None:
    alice = front.stub("alice")
    size = 16 * MiB
    job_id = start_job(
        alice, "sh", "-c", "sleep 1; " + RANDOM_WITH_HASH.format(size=size), node="w1"
    )
    # All four follow from the start while the job runs (it waits a second first).
    with ThreadPoolExecutor(4) as pool:
        followers = list(pool.map(lambda _: _streams(alice, job_id), range(4)))
    expected = _hash_line(followers[0])
    for chunks in followers:
        data = _stdout(chunks)
        assert len(data) == size
        assert hashlib.sha256(data).hexdigest() == expected


def test_a_slow_follower_leaves_the_shared_stream_and_misses_nothing(front: Front) -> None:
    """Followers of one job share one stream from its node (fanout.py); one that stops
    reading for a while falls behind the fast one, goes on alone from its offset, and
    still gets every byte."""
    alice = front.stub("alice")
    size = 48 * MiB
    job_id = start_job(
        alice, "sh", "-c", "sleep 1; " + RANDOM_WITH_HASH.format(size=size), node="w1"
    )

    def slow() -> list[pb.JobOutputChunk]:
        stream = alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        first = next(stream)
        time.sleep(5)  # its client stops reading: the fast follower runs ahead
        return [first, *stream]

    with ThreadPoolExecutor(2) as pool:
        slow_one = pool.submit(slow)
        fast = _streams(alice, job_id)
        behind = slow_one.result()
    for chunks in (fast, behind):
        data = _stdout(chunks)
        assert len(data) == size
        assert hashlib.sha256(data).hexdigest() == _hash_line(fast)
    alone = [line for line in front.log().splitlines() if '"output_follower_alone"' in line]
    assert any(job_id in line for line in alone), alone


def test_a_stopping_front_tells_its_relayed_followers_at_once(
    start_front: StartFront, front: Front
) -> None:
    """SIGTERM of a relaying front ends its followers' calls with UNAVAILABLE and the
    offset to resume from as it stops, not at the end of its drain: with a drain of 300 s
    here, the call's 60 s deadline would come first."""
    relay = start_front("--no-ray-direct-output", "--grace=300")
    counting = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done"
    job_id = start_job(relay.stub("alice"), "sh", "-c", counting, node="w1")
    try:
        stream = relay.stub("alice").StreamOutput(pb.JobRequest(job_id=job_id), timeout=60)
        first = next(stream)
        assert first.data.startswith(b"0\n")
        relay.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE, ended.value.details()
        assert "resume from offset" in (ended.value.details() or "")
    finally:
        relay.terminate()
        front.stub("alice").StopJob(pb.JobRequest(job_id=job_id, grace_seconds=0), timeout=60)


@attrs.frozen
class AgentPort:
    address: str
    cert_pem: bytes
    #: The certificate the test had the agent pin, with its key.
    pinned: SelfSigned


@pytest.fixture(scope="module")
def w1_port(front: Front, ray_cluster: LocalCluster, ray_token: RayToken) -> AgentPort:
    """w1's agent port, found as a front finds it (a Ray call with the token), with a
    certificate of the test's pinned by the agent."""
    pinned = SelfSigned.new(FRONT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({**RAY_ENV, **ray_token.env})
    asked = subprocess.run(
        [sys.executable, "-c", ASK_PORT, ray_cluster.address, "w1"],
        input=pinned.cert_pem, capture_output=True, env=env, timeout=120,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr.decode()
    found = json.loads(asked.stdout.decode().strip().splitlines()[-1])
    return AgentPort(found["address"], found["cert"].encode(), pinned)


def _ask(channel: grpc.Channel, job_id: str) -> list[bytes]:
    call = channel.unary_stream(
        f"/{SERVICE}/StreamOutput", request_serializer=pb.JobRequest.SerializeToString
    )
    return list(call(pb.JobRequest(job_id=job_id), timeout=30))


@pytest.fixture
def w1_job(front: Front) -> Iterator[str]:
    alice = front.stub("alice")
    job_id = start_job(alice, "echo", "secret", node="w1")
    _streams(alice, job_id)
    yield job_id


def _pinned_channel(port: AgentPort, client: SelfSigned) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=port.cert_pem,
        private_key=client.key_pem,
        certificate_chain=client.cert_pem,
    )
    options = [("grpc.ssl_target_name_override", AGENT_NAME)]
    return grpc.secure_channel(port.address, credentials, options=options)


def test_the_port_serves_a_pinned_front_only(
    w1_port: AgentPort, w1_job: str, front: Front, tmp_path: Path
) -> None:
    host = w1_port.address.rpartition(":")[0]
    assert host == "127.0.0.1"  # the node's announced address, not 0.0.0.0
    # The certificate the agent pinned: the job's output (so the refusals below are the
    # port's, not a port that serves nobody).
    with _pinned_channel(w1_port, w1_port.pinned) as channel:
        assert b"secret\n" in b"".join(_ask(channel, w1_job))
    # Another self-signed certificate with the same name: the handshake fails.
    stranger = SelfSigned.new(FRONT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH)
    with _pinned_channel(w1_port, stranger) as channel, pytest.raises(grpc.RpcError) as refused:
        _ask(channel, w1_job)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    # One the API's CA signed (a client of the front), once a front asked for a ticket
    # (direct output: the agent trusts the CA then): past the handshake, and no further
    # without a ticket (test_cluster_direct.py has the rest).
    asked = pb.JobRequest(job_id=w1_job, direct_ok=True)
    (redirect,) = front.stub("alice").StreamOutput(asked, timeout=30)
    assert redirect.HasField("redirect")
    files = front.pki.client("alice")
    client = SelfSigned(files.cert.read_bytes(), files.key.read_bytes())
    with _pinned_channel(w1_port, client) as channel, pytest.raises(grpc.RpcError) as refused:
        _ask(channel, w1_job)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # Plaintext: refused.
    with grpc.insecure_channel(w1_port.address) as channel, pytest.raises(grpc.RpcError) as refused:
        _ask(channel, w1_job)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    # TLS 1.2, even with the pinned certificate: no handshake (TLS 1.3 with the same
    # context: one, so the refusal is the version's).
    (tmp_path / "cert.pem").write_bytes(w1_port.pinned.cert_pem)
    (tmp_path / "key.pem").write_bytes(w1_port.pinned.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=w1_port.cert_pem.decode())
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    context.set_alpn_protocols(["h2"])
    host, _, port = w1_port.address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        context.wrap_socket(sock, server_hostname=AGENT_NAME).close()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        pytest.raises((ssl.SSLError, ConnectionResetError)),
    ):
        context.wrap_socket(sock, server_hostname=AGENT_NAME).close()


def test_a_job_on_the_node_cannot_reach_the_port(w1_port: AgentPort, front: Front) -> None:
    targets = json.dumps({"output port": [w1_port.address, ""]})
    # The probe connects from here (so a refusal below is the job's network).
    here = subprocess.run(
        [sys.executable, "-I", "-c", CONNECT_PROBE, targets], capture_output=True, timeout=60
    )
    assert json.loads(here.stdout) == {"output port": "connected"}
    # From a job on that node, on the default (private) network: denied.
    answers = json.loads(_run_python(front.stub("alice"), CONNECT_PROBE, targets))
    assert answers["output port"] != "connected", answers

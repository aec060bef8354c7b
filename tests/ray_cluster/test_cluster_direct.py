"""Direct output (docs/cluster.md): a client that can reach the nodes is redirected to the
job's node and reads the output there with a one-call ticket bound to its certificate and
the job, byte-exact and resumable; every other use of the node's port is refused."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable

import grpc
import pytest

from jobworker.api import codec
from jobworker.api.direct import TICKET_METADATA
from jobworker.api.tlsfiles import TlsFiles
from jobworker.client import JobClient
from jobworker.v1 import jobworker_pb2 as pb
from tests.ray_cluster.conftest import JOBWORKER, Front, StartFront
from tests.ray_cluster.test_cluster_output import RANDOM_WITH_HASH, RPC_TIMEOUT_S, MiB
from tests.serverfixtures import NOT_WHITELISTED, start_job, wait_exited


def _redirect(front: Front, client: str, job_id: str, offset: int = 0) -> codec.Redirect:
    """What the front answers ``client`` asking ``direct_ok``: one redirect, nothing else."""
    request = pb.JobRequest(job_id=job_id, offset=offset, direct_ok=True)
    chunks = list(front.stub(client).StreamOutput(request, timeout=RPC_TIMEOUT_S))
    assert len(chunks) == 1 and chunks[0].HasField("redirect"), chunks[:2]
    assert (chunks[0].data, chunks[0].HasField("status")) == (b"", False)
    return codec.decode_redirect(chunks[0].redirect.SerializeToString())


def _node_channel(front: Front, client: str, redirect: codec.Redirect) -> grpc.Channel:
    """A channel to the redirect's port as the client library makes it: ``client``'s own
    certificate, the port's certificate as the only root."""
    files = front.pki.client(client)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=redirect.certificate,
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", redirect.server_name)]
    return grpc.secure_channel(redirect.address, credentials, options=options)


def _read(
    channel: grpc.Channel, job_id: str, ticket: str | None, offset: int = 0
) -> list[pb.JobOutputChunk]:
    call = channel.unary_stream(
        "/jobworker.v1.NodeOutput/StreamOutput",
        request_serializer=pb.JobRequest.SerializeToString,
        response_deserializer=pb.JobOutputChunk.FromString,
    )
    metadata = () if ticket is None else ((TICKET_METADATA, ticket),)
    request = pb.JobRequest(job_id=job_id, offset=offset)
    return list(call(request, metadata=metadata, timeout=RPC_TIMEOUT_S))


def _code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    code: grpc.StatusCode = refused.value.code()
    return code


@pytest.fixture(scope="module")
def random_job(front: Front) -> tuple[str, bytes, str]:
    """A finished job on w1 with 8 MiB of random stdout: its id, the bytes as the front
    relays them, and their SHA-256 as the job printed it on stderr."""
    alice = front.stub("alice")
    job_id = start_job(alice, "sh", "-c", RANDOM_WITH_HASH.format(size=8 * MiB), node="w1")
    wait_exited(alice, job_id)
    relayed = list(alice.StreamOutput(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S))
    data = b"".join(c.data for c in relayed if c.stream == "stdout")
    digest = b"".join(c.data for c in relayed if c.stream == "stderr").decode().split()[0]
    assert hashlib.sha256(data).hexdigest() == digest
    return job_id, data, digest


def test_a_redirected_client_reads_the_node_byte_exact_and_resumes_there(
    front: Front, random_job: tuple[str, bytes, str]
) -> None:
    job_id, data, _ = random_job
    redirect = _redirect(front, "alice", job_id)
    assert redirect.address.startswith("127.0.0.1:") and redirect.server_name
    with _node_channel(front, "alice", redirect) as channel:
        chunks = _read(channel, job_id, redirect.ticket)
        assert b"".join(c.data for c in chunks if c.stream == "stdout") == data
        # From the middle, with a new ticket: exactly the rest.
        middle = len(chunks) // 2
        again = _redirect(front, "alice", job_id, chunks[middle].offset)
        rest = _read(channel, job_id, again.ticket, chunks[middle].offset)
        head = b"".join(c.data for c in chunks[: middle + 1] if c.stream == "stdout")
        assert head + b"".join(c.data for c in rest if c.stream == "stdout") == data
        # A ticket serves one call.
        spent = _code_of(lambda: _read(channel, job_id, redirect.ticket))
        assert spent is grpc.StatusCode.UNAUTHENTICATED


def test_the_node_port_refuses_whoever_holds_no_ticket_of_its_own(
    front: Front, random_job: tuple[str, bytes, str]
) -> None:
    job_id, _, _ = random_job
    redirect = _redirect(front, "alice", job_id)
    # Without a ticket, or with a made-up one: UNAUTHENTICATED.
    with _node_channel(front, "alice", redirect) as channel:
        assert _code_of(lambda: _read(channel, job_id, None)) is grpc.StatusCode.UNAUTHENTICATED
        made_up = _code_of(lambda: _read(channel, job_id, "x" * 43))
        assert made_up is grpc.StatusCode.UNAUTHENTICATED
    # Alice's ticket from another certificate of the CA: bob's (whitelisted), mallory's
    # (not whitelisted): PERMISSION_DENIED, and the ticket is still alice's.
    for other in ("bob", NOT_WHITELISTED):
        with _node_channel(front, other, redirect) as channel:
            stolen = _code_of(lambda c=channel: _read(c, job_id, redirect.ticket))
            assert stolen is grpc.StatusCode.PERMISSION_DENIED, other
    # Alice's ticket for another job of hers: PERMISSION_DENIED.
    other_job = start_job(front.stub("alice"), "echo", "other", node="w1")
    with _node_channel(front, "alice", redirect) as channel:
        elsewhere = _code_of(lambda: _read(channel, other_job, redirect.ticket))
        assert elsewhere is grpc.StatusCode.PERMISSION_DENIED
        assert _read(channel, job_id, redirect.ticket)  # unspent until then
    # Bob asking the front for alice's job gets the front's refusal, not a ticket.
    request = pb.JobRequest(job_id=job_id, direct_ok=True)
    asked = _code_of(lambda: list(front.stub("bob").StreamOutput(request, timeout=30)))
    assert asked is grpc.StatusCode.NOT_FOUND


def test_the_client_library_and_run_read_the_node_and_end_with_the_exit_code(
    front: Front, random_job: tuple[str, bytes, str]
) -> None:
    job_id, data, _ = random_job
    files = front.pki.client("alice")
    tls = TlsFiles(files.cert, files.key, files.ca)
    with JobClient(front.address, tls) as client:
        got = b"".join(d for s, d, _ in client.stream(job_id) if s == "stdout")
        assert got == data
        assert client._nodes, "the library did not read from the node"
    # `jobworker run`: the job's output from its node, then its exit status.
    script = (
        'f=$(mktemp); head -c 3000000 /dev/urandom > "$f"; cat "$f" >&2; sha256sum < "$f"; exit 7'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWORKER_")}
    env.update(
        JOBWORKER_SERVER=front.address, JOBWORKER_TLS_CERT=str(files.cert),
        JOBWORKER_TLS_KEY=str(files.key), JOBWORKER_TLS_CA=str(files.ca),
    )  # fmt: skip
    run = subprocess.run(
        [JOBWORKER, "run", "--node", "w1", "--", "sh", "-c", script],
        capture_output=True, env=env, timeout=RPC_TIMEOUT_S,
    )  # fmt: skip
    assert run.returncode == 7, run.stderr[-2000:]
    assert len(run.stderr) == 3_000_000
    assert run.stdout.decode().split()[0] == hashlib.sha256(run.stderr).hexdigest()


def test_a_front_with_direct_output_off_relays(
    start_front: StartFront, random_job: tuple[str, bytes, str]
) -> None:
    job_id, data, _ = random_job
    relay_only = start_front("--no-ray-direct-output")
    try:
        request = pb.JobRequest(job_id=job_id, direct_ok=True)
        chunks = list(relay_only.stub("alice").StreamOutput(request, timeout=RPC_TIMEOUT_S))
        assert not any(c.HasField("redirect") for c in chunks)
        assert b"".join(c.data for c in chunks if c.stream == "stdout") == data
    finally:
        relay_only.terminate()

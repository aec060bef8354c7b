"""The bytes made and read by hand (jobworker.api.codec) are those of the generated classes,
both ways: what the client sends parses as the request it means, what the server sends
reads as it wrote it, unknown fields skipped."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.api import codec, wire
from jobworker.errors import RemoteError, UsageError
from jobworker.jobspec import IoLimit, JobSpec, Limits
from jobworker.model import (
    OutputChunk,
    Stream,
    TerminationReason,
)
from jobworker.v1 import jobworker_pb2 as pb

_texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
_optional = st.none() | _texts


@given(
    command=_texts,
    args=st.lists(_texts, max_size=4),
    env=st.none() | st.dictionaries(_texts, _texts, max_size=3),
    cwd=_optional,
    user=_optional,
    network=_optional,
    stdin=st.booleans(),
    node=_optional,
)
def test_a_start_request_is_what_protobuf_reads(
    command: str,
    args: list[str],
    env: dict[str, str] | None,
    cwd: str | None,
    user: str | None,
    network: str | None,
    stdin: bool,
    node: str | None,
) -> None:
    raw = codec.start_request(command, args, env, cwd, None, user, network, stdin, node)
    assert pb.StartJobRequest.FromString(raw) == pb.StartJobRequest(
        command=command,
        args=args,
        env=env or {},
        cwd=cwd or "",
        user=user or "",
        network=network or "",
        stdin=stdin,
        node=node or "",
    )


def test_a_start_request_with_limits_survives_the_wire() -> None:
    limits = Limits(cpu=0.5, memory=1 << 30, pids=64, io=(IoLimit("8:0", rbps=1 << 20),))
    raw = codec.start_request("env", ["-0"], {"A": "1"}, "/tmp", limits)
    assert wire.spec_from_pb(pb.StartJobRequest.FromString(raw)) == JobSpec(
        "env", ("-0",), env={"A": "1"}, cwd="/tmp", limits=limits
    )


def test_text_that_is_not_utf8_is_refused_before_sending() -> None:
    with pytest.raises(UsageError, match=r"argument 2 holds bytes that are not UTF-8 \(ff"):
        codec.start_request("echo", ["ok", "\udcff"], None, None, None)


@pytest.mark.parametrize(
    ("fields"),
    [
        {"job_id": "j"},
        {"job_id": "j", "offset": 1 << 40, "no_follow": True},
        {"job_id": "j", "with_status": True},
        {"job_id": "j", "offset": 5, "with_status": True, "direct_ok": True},
    ],
)
def test_a_job_request_is_what_protobuf_reads(fields: dict[str, object]) -> None:
    assert pb.JobRequest.FromString(codec.job_request(**fields)) == pb.JobRequest(**fields)


def test_the_start_answer_reads_with_unknown_fields() -> None:
    raw = pb.StartJobResponse(job_id="j-1").SerializeToString()
    assert codec.start_response_job_id(raw + b"\x10\x07\x1a\x01z") == "j-1"
    with pytest.raises(RemoteError, match="undecodable StartJob answer"):
        codec.start_response_job_id(raw[:-1])


@pytest.mark.parametrize("size", [1, 127, 128, 300, 65536, 256 * 1024])
@pytest.mark.parametrize("offset", [1, 127, 128, 1 << 40])
def test_hand_encoded_chunk_is_what_protobuf_makes(size: int, offset: int) -> None:
    for stream in Stream:
        chunk = OutputChunk(stream, bytes(range(256)) * (size // 256) + b"x" * (size % 256), offset)
        expected = pb.JobOutputChunk(data=chunk.data, stream=stream.label, offset=offset)
        assert codec.encode_chunk(chunk) == expected.SerializeToString()


def test_hand_decoded_chunk_reads_what_protobuf_writes() -> None:
    data = bytes(range(256)) * 1000
    raw = pb.JobOutputChunk(data=data, stream="stderr", offset=1 << 40).SerializeToString()
    stream, view, offset, end, redirect = codec.decode_chunk(raw + b"\x30\x07\x3a\x01z")  # 6, 7
    assert (stream, bytes(view), offset, end, redirect) == ("stderr", data, 1 << 40, None, None)
    with pytest.raises(RemoteError, match="undecodable chunk"):
        codec.decode_chunk(raw[:-3])


def test_a_redirect_is_what_protobuf_makes_and_reads() -> None:
    redirect = codec.Redirect("10.0.0.7:41234", b"-----BEGIN CERT", "jobworker-agent", "t0k", 30.0)
    message = pb.OutputRedirect(
        address=redirect.address,
        certificate=redirect.certificate,
        server_name=redirect.server_name,
        ticket=redirect.ticket,
        expires_in_seconds=redirect.expires_in,
    )
    raw = codec.encode_redirect(redirect)
    assert raw == pb.JobOutputChunk(redirect=message).SerializeToString()
    chunk = codec.decode_chunk(raw)
    assert (chunk.data.tobytes(), chunk.status) == (b"", None)
    assert chunk.redirect is not None
    assert codec.decode_redirect(chunk.redirect) == redirect


def test_a_redirect_without_a_ticket_is_refused() -> None:
    raw = pb.OutputRedirect(address="10.0.0.7:1", certificate=b"c").SerializeToString()
    with pytest.raises(RemoteError, match="redirect without an address or ticket"):
        codec.decode_redirect(raw)


def test_lost_reasons_are_the_models() -> None:
    assert set(codec.LOST_REASONS) == {
        TerminationReason.NODE_LOST.value,
        TerminationReason.LOST.value,
    }

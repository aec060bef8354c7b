"""Protobuf bytes made and read by hand, where protobuf's runtime costs too much: the output
stream (every byte of output passes through :func:`encode_chunk` and :func:`decode_chunk`)
and ``jobworker run``'s calls (StartJob, StreamOutput and the job's end), so that a client
running one job imports neither protobuf nor the model (docs/performance.md, "The client's
start-up"). Everything else translates through the generated classes in
:mod:`jobworker.api.wire`.

The bytes are those protobuf makes for proto/jobworker/v1/jobworker.proto (tests compare
them with the generated classes both ways); readers skip unknown fields, as protobuf does.
The module imports nothing of the model at run time, so it stays as light as the client.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from jobworker.errors import RemoteError, UsageError

if TYPE_CHECKING:
    from jobworker.jobspec import Limits
    from jobworker.model import OutputChunk

#: Wire types (the low three bits of a field's key).
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

#: ``reason`` of a job lost with its cluster node, or across a server restart
#: (``TerminationReason``'s values): no exit status to report.
LOST_REASONS = ("node_lost", "lost")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(raw: bytes | memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """``(field number, value)`` of each field of a message: an int (varint, or a fixed
    field's bits) or a view of a length-delimited field. Raises ValueError or IndexError
    for bytes that are not a message."""
    view = memoryview(raw)
    pos = 0
    while pos < len(view):
        key, pos = _read_varint(view, pos)
        kind = key & 7
        if kind == _LEN:
            length, pos = _read_varint(view, pos)
            if pos + length > len(view):
                raise ValueError("truncated field")
            yield key >> 3, view[pos : pos + length]
            pos += length
        elif kind == _VARINT:
            value, pos = _read_varint(view, pos)
            yield key >> 3, value
        elif kind in (_I64, _I32):
            size = 8 if kind == _I64 else 4
            if pos + size > len(view):
                raise ValueError("truncated field")
            yield key >> 3, int.from_bytes(view[pos : pos + size], "little")
            pos += size
        else:
            raise ValueError(f"wire type {kind}")


def _text(field: int, value: str) -> bytes:
    """A string field; nothing for "" (proto3 leaves defaults out)."""
    if not value:
        return b""
    data = value.encode()
    return _varint(field << 3 | _LEN) + _varint(len(data)) + data


def _message(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | _LEN) + _varint(len(data)) + data


def _number(field: int, value: int) -> bytes:
    """A varint field; nothing for 0."""
    return _varint(field << 3 | _VARINT) + _varint(value) if value else b""


# -- StartJob -------------------------------------------------------------------------------


def _check_utf8(what: str, text: str) -> None:
    """Refuse text that cannot travel: protobuf strings are UTF-8, and a command line may
    hold any bytes (Python keeps those that are not UTF-8 as lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end]
        try:
            raw = bad.encode(errors="surrogateescape")  # the bytes of the command line
        except UnicodeEncodeError:
            raw = bad.encode(errors="surrogatepass")  # a surrogate given as such
        raise UsageError(
            f"{what} holds bytes that are not UTF-8 ({raw.hex(' ')} at character"
            f" {err.start + 1}): the API carries text as protobuf strings, which are UTF-8;"
            " pass the value through a file, or encode it (base64, say) for the job to decode"
        ) from None


def start_request(
    command: str,
    args: Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    limits: Limits | None,
    user: str | None = None,
    network: str | None = None,
    stdin: bool = False,
    node: str | None = None,
) -> bytes:
    """A ``StartJobRequest``; raises ``UsageError`` for text that is not UTF-8. Limits,
    which only some jobs have, go through the generated classes (:mod:`jobworker.api.wire`).
    """
    _check_utf8("the command", command)
    for number, arg in enumerate(args, 1):
        _check_utf8(f"argument {number}", arg)
    for key, value in (env or {}).items():
        _check_utf8("an environment variable name", key)
        _check_utf8(f"environment variable {key.encode(errors='replace').decode()}", value)
    for what, text in (("--cwd", cwd), ("--user", user), ("--network", network), ("--node", node)):
        _check_utf8(what, text or "")
    parts = [_text(1, command)]
    parts += [_message(2, arg.encode()) for arg in args]  # repeated: "" is sent too
    parts += [_message(3, _message(1, k.encode()) + _text(2, v)) for k, v in (env or {}).items()]
    parts.append(_text(4, cwd or ""))
    if limits is not None:
        from jobworker.api import wire

        parts.append(_message(5, wire.limits_to_pb(limits).SerializeToString()))
    parts += [_text(6, user or ""), _text(7, network or ""), _text(8, node or "")]
    parts.append(_number(9, stdin))
    return b"".join(parts)


def start_response_job_id(raw: bytes) -> str:
    """The ``job_id`` of a ``StartJobResponse``."""
    job_id = ""
    for field, value in _checked_fields(raw, "StartJob answer"):
        if field == 1 and isinstance(value, memoryview):
            job_id = _decoded(value)
    return job_id


# -- StreamOutput ---------------------------------------------------------------------------


def job_request(
    job_id: str,
    offset: int = 0,
    *,
    no_follow: bool = False,
    with_status: bool = False,
    direct_ok: bool = False,
) -> bytes:
    """A ``JobRequest`` for StreamOutput."""
    return (
        _text(1, job_id)
        + _number(3, offset)
        + _number(4, no_follow)
        + _number(5, with_status)
        + _number(6, direct_ok)
    )


#: ``stream`` (field 2, length-delimited) of a JobOutputChunk, encoded once per label.
_STREAM_FIELD = {label: _text(2, label) for label in ("stdout", "stderr")}


def encode_chunk(chunk: OutputChunk) -> bytes:
    """``chunk`` as the bytes of a ``JobOutputChunk``, the same bytes protobuf would make.

    By hand because every byte of output passes here: one copy of ``data`` instead of three
    (into the message, out of it, and into grpc), which the stream's throughput and the
    memory a slow follower pins both feel. The service sends these bytes as they are.
    """
    return b"".join(
        (
            b"\x0a",  # data: field 1, length-delimited
            _varint(len(chunk.data)),
            chunk.data,
            _STREAM_FIELD[chunk.stream.label],
            b"\x18",  # offset: field 3, varint
            _varint(chunk.offset),
        )
    )


class Chunk(NamedTuple):
    """A decoded ``JobOutputChunk``: ``data`` a view into the received bytes (no copy: the
    CLI writes it out as it is); ``status`` the bytes of the job's final
    ``JobStatusResponse`` in the last chunk of a stream asked ``with_status`` (read it with
    :func:`decode_end`), ``redirect`` those of an ``OutputRedirect`` (:func:`decode_redirect`)
    in the one chunk of a stream redirected to the job's node; else None."""

    stream: str
    data: memoryview
    offset: int
    status: memoryview | None
    redirect: memoryview | None


def decode_chunk(raw: bytes) -> Chunk:
    """The fields of a ``JobOutputChunk``'s bytes; raises RemoteError for bytes that are
    not a chunk."""
    data, stream, offset = memoryview(raw)[0:0], "", 0
    status: memoryview | None = None
    redirect: memoryview | None = None
    for field, value in _checked_fields(raw, "chunk"):
        if isinstance(value, int):
            if field == 3:
                offset = value
        elif field == 1:
            data = value
        elif field == 2:
            stream = _decoded(value)
        elif field == 4:
            status = value
        elif field == 5:
            redirect = value
    return Chunk(stream, data, offset, status, redirect)


class Redirect(NamedTuple):
    """Where a job's output is served by its node (``OutputRedirect``): the node agent's
    port, the certificate to trust there (alone) and the name in it, and the ticket that
    lets this client's certificate read this job there once."""

    address: str
    certificate: bytes
    server_name: str
    ticket: str
    #: Seconds the ticket stays good for its first use.
    expires_in: float


def encode_redirect(redirect: Redirect) -> bytes:
    """A ``JobOutputChunk`` holding only ``redirect``."""
    message = (
        _text(1, redirect.address)
        + (_message(2, redirect.certificate) if redirect.certificate else b"")
        + _text(3, redirect.server_name)
        + _text(4, redirect.ticket)
        + (b"\x29" + struct.pack("<d", redirect.expires_in) if redirect.expires_in else b"")
    )
    return _message(5, message)


def decode_redirect(raw: bytes | memoryview) -> Redirect:
    """The :class:`Redirect` of an ``OutputRedirect``'s bytes; raises RemoteError for bytes
    that are not one, or one without an address, certificate or ticket."""
    text = {1: "", 3: "", 4: ""}
    certificate, expires_in = b"", 0.0
    for field, value in _checked_fields(raw, "redirect"):
        if field == 2 and isinstance(value, memoryview):
            certificate = bytes(value)
        elif field == 5 and isinstance(value, int):
            expires_in = struct.unpack("<d", value.to_bytes(8, "little"))[0]
        elif field in text and isinstance(value, memoryview):
            text[field] = _decoded(value)
    if not (text[1] and certificate and text[4]):
        raise RemoteError("UNKNOWN", "the server sent a redirect without an address or ticket")
    return Redirect(text[1], certificate, text[3], text[4], expires_in)


class JobEnd(NamedTuple):
    """How a followed job ended, as ``jobworker run`` needs it: the part of its final
    ``JobStatusResponse`` that makes the command's exit status (a tuple, not one of the
    model's attrs classes: the client's run path imports no attrs)."""

    job_id: str
    #: "running" or "exited" (``JobState``'s values).
    state: str
    #: ``TerminationReason``'s value; "" while running.
    reason: str
    #: The status a shell would report (the exit code, or 128+N after signal N); None
    #: while running and for a job lost (:data:`LOST_REASONS`).
    exit_code: int | None
    #: The cluster node it ran on; "" on one server.
    node: str


def decode_end(raw: bytes | memoryview) -> JobEnd:
    """The :class:`JobEnd` of a ``JobStatusResponse``'s bytes (wire.py states the exit
    code's conventions); raises RemoteError for bytes that are not one."""
    text = {1: "", 2: "", 4: "", 21: ""}
    exit_code = 0
    for field, value in _checked_fields(raw, "job status"):
        if field == 3 and isinstance(value, int):
            exit_code = value - (1 << 64) if value >= 1 << 63 else value  # int32, sign-extended
        elif field in text and isinstance(value, memoryview):
            text[field] = _decoded(value)
    state, reason = text[2], text[4]
    ended = state == "exited" and reason not in LOST_REASONS
    return JobEnd(text[1], state, reason, exit_code if ended else None, text[21])


def _checked_fields(raw: bytes | memoryview, what: str) -> list[tuple[int, int | memoryview]]:
    try:
        return list(_fields(raw))
    except (ValueError, IndexError) as err:
        raise RemoteError("UNKNOWN", f"the server sent an undecodable {what} ({err})") from None


def _decoded(value: memoryview) -> str:
    try:
        return str(value, "utf-8")
    except UnicodeDecodeError as err:
        raise RemoteError("UNKNOWN", f"the server sent text that is not UTF-8 ({err})") from None

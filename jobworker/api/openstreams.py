"""Streams outlive the check at their start: end them when their certificate stops being good.

Every RPC is admitted with a certificate inside its validity dates and not revoked
(:func:`jobworker.api.tls.check_peer`), but a stream (``logs -f``, ``WriteInput``) may stay
open for hours after that check. :class:`OpenStreams` keeps each open stream with its
client certificate and ends it with UNAUTHENTICATED the moment the certificate expires (a
timer at its notAfter) or a reload puts a CRL in force that revokes it (:meth:`recheck`).

Ending is a cancellation of the RPC's task, turned into :class:`Unauthenticated` where the
stream's own code is waiting (for output, or for the client's next message). A stream that
is handing a message to grpc at that moment is not cancelled there (grpc would end the call
as CANCELLED): it ends before taking its next item, or after :data:`END_WITHIN` seconds
when its client does not read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import attrs
import structlog

from jobworker.api import tls
from jobworker.errors import Unauthenticated

log = structlog.get_logger("jobworker.api.openstreams")

#: How long a stream that is sending may go on once its certificate is no longer good.
END_WITHIN = 1.0
#: Margin past a certificate's notAfter before the check (timers may fire a little early).
_EXPIRY_MARGIN = 0.01


@attrs.define(eq=False)
class OpenStream:
    """One open stream: its task, its client's certificate, and why it must end (once
    known)."""

    task: asyncio.Task[object]
    certificate: bytes
    name: str
    #: True while the stream's code awaits (output, a client message), where it may be
    #: cancelled; StreamOutput clears it while grpc sends a message.
    waiting: bool = True
    reason: str | None = None
    timer: asyncio.TimerHandle | None = None

    def check(self) -> None:
        """Raise ``Unauthenticated`` if the stream must end (between two messages)."""
        if self.reason is not None:
            raise Unauthenticated(self.reason)

    def end(self, reason: str) -> None:
        self.reason = reason
        if self.waiting:
            self.task.cancel()
        else:
            asyncio.get_running_loop().call_later(END_WITHIN, self.task.cancel)


class OpenStreams:
    """The streaming RPCs open now; see the module docstring."""

    def __init__(self, crl: tls.RevocationList | None) -> None:
        self._crl = crl
        self._open: set[OpenStream] = set()

    def __len__(self) -> int:
        return len(self._open)

    @contextmanager
    def guard(self, certificate: bytes, name: str) -> Iterator[OpenStream]:
        """Around the body of one stream, in its own task: an ending turns the task's
        cancellation into ``Unauthenticated`` with the reason."""
        task = asyncio.current_task()
        assert task is not None
        stream = OpenStream(task, certificate, name)
        self._open.add(stream)
        self._arm(stream)
        try:
            yield stream
        except asyncio.CancelledError:
            if stream.reason is None:
                raise
            task.uncancel()
            raise Unauthenticated(stream.reason) from None
        finally:
            self._open.discard(stream)
            if stream.timer is not None:
                stream.timer.cancel()

    def recheck(self) -> None:
        """Check every open stream again (a reload may have revoked its certificate)."""
        for stream in list(self._open):
            self._check(stream)

    def _arm(self, stream: OpenStream) -> None:
        """A timer at the certificate's notAfter."""
        not_after = tls.validity_dates(stream.certificate).not_after
        delay = (not_after - datetime.now(UTC)).total_seconds() + _EXPIRY_MARGIN
        stream.timer = asyncio.get_running_loop().call_later(max(delay, 0.0), self._due, stream)

    def _due(self, stream: OpenStream) -> None:
        if not self._check(stream) and stream in self._open:
            self._arm(stream)  # the timer fired a little early

    def _check(self, stream: OpenStream) -> bool:
        """End ``stream`` if its certificate is no longer good; whether it was ended."""
        if stream.reason is not None or stream not in self._open:
            return True
        reason = tls.refusal(stream.certificate, self._crl)
        if reason is None:
            return False
        log.warning("stream_unauthenticated", identity=stream.name, reason=reason)
        stream.end(f"{stream.name}: {reason}")
        return True

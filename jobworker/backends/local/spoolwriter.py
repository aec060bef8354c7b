"""The writing side of a job's output log: the record format, the spool budget and the cut.

The file is a sequence of records ``[stream:u8][length:u32 BE][data]`` in arrival order, so
stdout and stderr each stay byte-exact and keep the order in which the server read them
(see docs/api.md for what that order is worth). Memory stays bounded whatever the job
writes: the writer appends to the page cache, and each follower reads with ``pread`` at its
own position (:mod:`jobworker.backends.local.outputlog`), so a slow follower never holds
anyone else back.

A :class:`SpoolWriter` appends records in the spool-writing thread
(:mod:`jobworker.backends.local.ingest`), so a slow disk never stalls the event loop; that
thread runs in the ingest process (:mod:`jobworker.backends.local.ingest_process`), or in
the server when a plugin observes output chunks. The :class:`SpoolState` it hands over is
what the event loop publishes to followers.

**The cut.** Output is kept up to the job's cap and while the server-wide
:class:`SpoolBudget` allows; past that, or after a write fails (disk full), the log is
*cut*: nothing more is spooled, what the job writes is still read (so it never blocks on a
full pipe) and counted, and a follower that reaches the cut gets
:class:`~jobworker.errors.DataLoss` instead of a clean end.
"""

from __future__ import annotations

import os
import struct
import threading

import attrs

from jobworker.model import Stream

#: A record's header: its stream and the length of its data.
HEADER = struct.Struct(">BI")
#: Largest record and largest chunk handed to a follower (one gRPC message).
CHUNK_MAX = 64 * 1024
#: Every this many records a boundary is marked, so a resume offset is checked by reading
#: a bounded number of headers.
MARK_EVERY = 256


class SpoolBudget:
    """Bytes of spool (records with their headers) all jobs of one server may hold, and
    the share of them one client's jobs may (``per_client``): one client filling its share
    never cuts another's output (docs/security.md, "Spool fairness").

    Thread-safe: ingest takes, the event loop gives back when a job's output is removed.
    Each job's log draws on its owner's :class:`SpoolAccount`.
    """

    def __init__(self, limit: int | None, per_client: int | None = None) -> None:
        self.limit = limit
        self.per_client = per_client
        self._used = 0
        self._by_client: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def used_by(self) -> dict[str, int]:
        """Bytes each client's jobs hold now."""
        with self._lock:
            return dict(self._by_client)

    def account(self, owner: str) -> SpoolAccount:
        return SpoolAccount(self, owner)

    def take(self, owner: str, wanted: int, *, force: bool = False) -> int:
        """Reserve up to ``wanted`` bytes for ``owner``'s jobs; how many were granted.
        ``force``: all of them, whatever the limits (spool already written)."""
        with self._lock:
            held = self._by_client.get(owner, 0)
            granted = wanted
            if not force and self.limit is not None:
                granted = min(granted, self.limit - self._used)
            if not force and self.per_client is not None:
                granted = min(granted, self.per_client - held)
            granted = max(0, granted)
            self._used += granted
            self._by_client[owner] = held + granted
            return granted

    def give_back(self, owner: str, amount: int) -> None:
        with self._lock:
            self._used -= amount
            left = self._by_client.get(owner, 0) - amount
            if left > 0:
                self._by_client[owner] = left
            else:
                self._by_client.pop(owner, None)

    def refusal(self, owner: str) -> str:
        """Which limit stops ``owner``'s jobs now, for the cut's reason."""
        with self._lock:
            total = None if self.limit is None else self.limit - self._used
            share = (
                None if self.per_client is None else self.per_client - self._by_client.get(owner, 0)
            )
        if share is not None and (total is None or share <= total):
            return (
                f"{owner}'s share of the server's spool, {self.per_client} bytes for all of"
                " its jobs (serve --max-spool-bytes-per-client)"
            )
        return (
            f"the server's spool budget of {self.limit} bytes for all jobs"
            " (serve --max-spool-bytes)"
        )


@attrs.frozen
class SpoolAccount:
    """One client's side of the :class:`SpoolBudget`: what its jobs' logs take and give."""

    budget: SpoolBudget
    owner: str

    @property
    def bounded(self) -> bool:
        return self.budget.limit is not None or self.budget.per_client is not None

    def take(self, wanted: int, *, force: bool = False) -> int:
        return self.budget.take(self.owner, wanted, force=force)

    def give_back(self, amount: int) -> None:
        self.budget.give_back(self.owner, amount)

    def refusal(self) -> str:
        return self.budget.refusal(self.owner)


def unlimited() -> SpoolAccount:
    """The account of a log whose owner does not matter (tests, tools): no limit."""
    return SpoolAccount(SpoolBudget(None), "")


@attrs.frozen
class SpoolState:
    """What a :class:`SpoolWriter` has spooled: handed to the event loop (in-process, or
    from the ingest process over its socket), which publishes it to followers."""

    size: int
    payload: int
    seen: int
    records: int
    #: Record boundaries added since the previous state (every :data:`MARK_EVERY`-th).
    marks: tuple[int, ...]
    cut: str | None
    charged: int


class SpoolWriter:
    """The writing side of one job's spool: records appended at the end, the output cap and
    the server's budget applied, and the cut. Runs in one thread at a time (the spool
    writer, here or in the ingest process); :meth:`take` may be called from another."""

    def __init__(self, fd: int, max_bytes: int | None, budget: SpoolAccount) -> None:
        self._fd = fd
        self._max_bytes = max_bytes
        self._budget = budget
        self._lock = threading.Lock()
        self._size = 0
        self._payload = 0
        self._records = 0
        self._marks: list[int] = []
        self._seen = 0
        self._cut: str | None = None
        self.charged = 0  # spool bytes taken from the budget

    def cut(self, reason: str) -> None:
        """Keep nothing more (any thread): followers get DATA_LOSS at what was kept."""
        with self._lock:
            if self._cut is None:
                self._cut = reason

    def take(self) -> SpoolState:
        """The state so far; the marks it carries are not carried again."""
        with self._lock:
            marks, self._marks = self._marks, []
            return SpoolState(
                self._size,
                self._payload,
                self._seen,
                self._records,
                tuple(marks),
                self._cut,
                self.charged,
            )

    def adopt(self, state: SpoolState) -> None:
        """Mirror a writer elsewhere (the ingest process), so that this one could go on
        where it stands; its budget charge stays there."""
        with self._lock:
            self._size, self._payload, self._seen = state.size, state.payload, state.seen
            self._records = state.records
            self._marks += state.marks
            if self._cut is None:
                self._cut = state.cut

    def resume(self, state: SpoolState) -> None:
        """Go on from ``state``, what an earlier writer of this spool left (live restore);
        what it charged is taken from this writer's budget."""
        self.adopt(state)
        self.charged = self._budget.take(state.charged, force=True)

    def write(self, stream: Stream, data: bytes) -> None:
        """Spool ``data``; never blocks on followers.

        Keeps what the cap and the budget allow; a failed write cuts the log (the job goes
        on). Raises nothing: the state records why it was cut.
        """
        with self._lock:
            self._seen += len(data)
            if self._cut is not None:
                return
        kept = len(data)
        reason = None
        if self._max_bytes is not None and self._payload + kept > self._max_bytes:
            kept = max(0, self._max_bytes - self._payload)
            reason = f"the job's output cap of {self._max_bytes} bytes (serve --max-output-bytes)"
        kept = self._reserve(kept)
        if reason is None and kept < len(data):
            reason = self._budget.refusal()
        if kept:
            try:
                self._write_records(stream, memoryview(data)[:kept])
            except OSError as err:
                reason = f"writing the spool failed: {err.strerror or err}"
        if reason is not None:
            self.cut(reason)

    def _reserve(self, kept: int) -> int:
        """Shrink ``kept`` payload bytes to what the budget grants, headers included."""
        if not kept or not self._budget.bounded:
            self.charged += self._budget.take(_spool_bytes(kept))
            return kept
        wanted = _spool_bytes(kept)
        granted = self._budget.take(wanted)
        if granted < wanted:
            # Whole records only: give back what a partial header would waste.
            records = -(-granted // (CHUNK_MAX + HEADER.size))
            kept = max(0, granted - records * HEADER.size)
            self._budget.give_back(granted - _spool_bytes(kept))
            granted = _spool_bytes(kept)
        self.charged += granted
        return kept

    def _write_records(self, stream: Stream, view: memoryview) -> None:
        # Every record of this read in one system call: the per-call cost dominates.
        parts: list[bytes | memoryview] = []
        marks: list[int] = []
        position, records = self._size, self._records
        for start in range(0, len(view), CHUNK_MAX):
            piece = view[start : start + CHUNK_MAX]
            parts += [HEADER.pack(stream, len(piece)), piece]
            position += HEADER.size + len(piece)
            records += 1
            if records % MARK_EVERY == 0:
                marks.append(position)
        total = position - self._size
        written = os.pwritev(self._fd, parts, self._size)
        if written < total:  # short writes are rare on regular files, not impossible
            rest = b"".join(parts)[written:]
            while rest:
                done = os.pwrite(self._fd, rest, self._size + total - len(rest))
                rest = rest[done:]
        with self._lock:
            self._size += total
            self._records = records
            self._marks += marks
            self._payload += len(view)

    def give_back(self) -> None:
        """Return the budget this log took (its spool is deleted)."""
        self._budget.give_back(self.charged)
        self.charged = 0


def _spool_bytes(payload: int) -> int:
    return payload + HEADER.size * -(-payload // CHUNK_MAX)


def scan(fd: int, seen: int | None, cut: str | None) -> SpoolState:
    """The state of a spool another process wrote (live restore), from its records.

    ``seen`` and ``cut`` are what the file cannot tell: bytes the job wrote past a cut, and
    why it was cut (``seen`` None: nothing past what the file holds). A record the writer
    did not finish (it was killed mid-write) is not counted: the next write replaces it.
    """
    end = os.fstat(fd).st_size
    position = payload = records = 0
    marks: list[int] = []
    while position + HEADER.size <= end:
        _, length = HEADER.unpack(os.pread(fd, HEADER.size, position))
        if position + HEADER.size + length > end:
            break
        position += HEADER.size + length
        payload += length
        records += 1
        if records % MARK_EVERY == 0:
            marks.append(position)
    return SpoolState(
        size=position,
        payload=payload,
        seen=max(payload, seen or 0),
        records=records,
        marks=tuple(marks),
        cut=cut,
        charged=position,
    )

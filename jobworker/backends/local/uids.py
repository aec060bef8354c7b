"""One uid per job: the pool isolated jobs draw their uid from, and when a uid may return.

Each job of a client without a ``run_as`` account runs as a uid of its own from the range
the operator gives (``serve --job-uid-range``, by default systemd's ``DynamicUser=`` range
61184-65519), with a group of the same number and no other group. A uid goes back to the
pool only once nothing of its last job can remain:

* the job is over: its PID namespace is gone, so every process in it was killed and reaped;
  its IPC objects and private tmpfs mounts died with its namespaces;
* no process on the host has it as real, effective, saved or filesystem uid (``/proc``);
* no file under a writable directory (``--isolation-writable``) is owned by it.

A uid that fails a check stays out of the pool; it is checked again when another job ends
or when the pool runs dry. Keys are the one thing that outlives every process of a uid
(the kernel keeps a uid's user keyrings until reboot): the next job's launcher empties them
before the command runs, and takes the right to change their permissions away, so that no
job can leave them unclearable (see ``_launcher_isolate.py``).

Free uids are handed out oldest-released first, so a uid rests as long as the range
allows. Allocation is a ``popleft`` and one non-blocking lock on the event loop; the checks
run in a worker thread and their result is applied on the loop, so nothing races.

Several servers on one host: each uid handed out is locked (an open-file-description lock
on its byte of :data:`LOCK_FILE`) until it returns to the pool, so servers whose ranges
overlap never run two jobs under one uid; a uid another server holds is skipped.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs
import structlog

from jobworker.backends.local.sampling import read_small
from jobworker.errors import ResourceExhausted

log = structlog.get_logger("jobworker.backends.local.uids")

#: systemd's ``DynamicUser=`` range: no Debian or Fedora package account lives there.
DEFAULT_RANGE = "61184-65519"
#: Shared by every server of the host (root only: a server that is not root draws no uid).
LOCK_FILE = Path("/run/jobworker-uids.lock")
#: How long a released uid waits before its checks run: jobs ending together share one pass.
RECLAIM_DELAY = 0.5


def _is_valid_uid(uid: int) -> bool:
    return 0 < uid < 0xFFFFFFFF


@attrs.frozen
class UidRange:
    """``first``-``last``, both included; never root, never the kernel's invalid uid."""

    first: int
    last: int

    def __attrs_post_init__(self) -> None:
        if not (_is_valid_uid(self.first) and _is_valid_uid(self.last)):
            raise ValueError(f"uids {self.first}-{self.last}: give uids from 1 to 4294967294")
        if self.first > self.last:
            raise ValueError(f"uid range {self.first}-{self.last} is empty: give FIRST-LAST")

    @classmethod
    def parse(cls, text: str) -> UidRange:
        """``FIRST-LAST`` (``61184-65519``); ValueError with a message a person can act on."""
        first, sep, last = text.strip().partition("-")
        if not (sep and first.strip().isdigit() and last.strip().isdigit()):
            raise ValueError(f"uid range {text!r}: give FIRST-LAST, e.g. {DEFAULT_RANGE}")
        return cls(int(first), int(last))

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.last + 1))

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last


def _process_uids() -> set[int]:
    """Every uid some process on the host has (real, effective, saved or filesystem)."""
    uids: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        raw = read_small(f"/proc/{name}/status")
        start = -1 if raw is None else raw.find(b"\nUid:")
        if raw is None or start < 0:
            continue  # gone since the listing
        line = raw[start + 5 : raw.find(b"\n", start + 1)]
        uids.update(int(field) for field in line.split())
    return uids


def _file_owners(directories: Iterable[str], wanted: set[int]) -> dict[int, str]:
    """For each uid of ``wanted`` owning a file under ``directories``: one such file."""
    found: dict[int, str] = {}
    stack = [d for d in directories if os.path.isdir(d)]
    while stack and len(found) < len(wanted):
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue  # gone, or not a directory any more
        for entry in entries:
            try:
                owner = entry.stat(follow_symlinks=False).st_uid
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
            except OSError:
                continue
            if owner in wanted:
                found.setdefault(owner, entry.path)
    return found


def leftovers(uids: set[int], writable: Iterable[str]) -> dict[int, str]:
    """What each uid of ``uids`` still holds on this host (absent: nothing); a thread's work."""
    held = {uid: "a process" for uid in uids & _process_uids()}
    rest = uids - held.keys()
    if rest:
        held.update((uid, f"file {path}") for uid, path in _file_owners(writable, rest).items())
    return held


@attrs.define(eq=False)
class UidPool:
    """The uids of one server's jobs (see the module docstring for the rules)."""

    range: UidRange
    writable: tuple[str, ...] = ()
    lock_file: Path = LOCK_FILE
    _free: collections.deque[int] = attrs.field(init=False, factory=collections.deque)
    _held: dict[str, int] = attrs.field(init=False, factory=dict)
    #: Released (or found holding something) and not yet back in ``_free``.
    _pending: set[int] = attrs.field(init=False, factory=set)
    _lock_fd: int = attrs.field(init=False, default=-1)
    _reclaim: asyncio.Task[None] | None = attrs.field(init=False, default=None)
    #: Something was released, or the pool ran dry, since the last check began.
    _dirty: bool = attrs.field(init=False, default=False)
    #: Pending uids already logged as holding something: each is logged once.
    _reported: set[int] = attrs.field(init=False, factory=set)

    def open(self) -> None:
        """Open the host's lock file and sort the range: uids a process or a file still
        has wait in ``pending`` (a server restarted under running jobs, another server)."""
        if self._lock_fd < 0:
            self._lock_fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        busy = leftovers(set(self.range), self.writable)
        self._free = collections.deque(uid for uid in self.range if uid not in busy)
        self._pending = set(busy)
        self._reported = set(busy)
        if busy:
            log.info("job_uids_in_use", count=len(busy), uids=sorted(busy)[:20])

    def close(self) -> None:
        if self._reclaim is not None:
            self._reclaim.cancel()
            self._reclaim = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # every lock of ours goes with it
            self._lock_fd = -1

    def allocate(self, job_id: str) -> int:
        """A uid for ``job_id``, now its alone; ResourceExhausted when none is free."""
        if self._lock_fd < 0:
            self.open()
        for _ in range(len(self._free)):
            uid = self._free.popleft()
            if self._lock(uid, fcntl.F_WRLCK):
                self._held[job_id] = uid
                return uid
            self._free.append(uid)  # another server's job has it now
        self._dirty = True
        self._schedule()
        waiting = f"; {len(self._pending)} wait until an earlier job's processes or files are gone"
        raise ResourceExhausted(
            f"no uid is free for the job: the {len(self.range)} uids of --job-uid-range"
            f" {self.range} are held by running jobs ({len(self._held)} here)"
            f"{waiting if self._pending else ''} or by another server on this host;"
            " retry when a job ends, or give the server a wider range"
        )

    def release(self, job_id: str) -> None:
        """``job_id`` is over (or never started): its uid returns once its checks pass."""
        uid = self._held.pop(job_id, None)
        if uid is None:
            return
        self._pending.add(uid)
        self._dirty = True
        self._schedule()

    def _lock(self, uid: int, kind: int) -> bool:
        # struct flock: l_type, l_whence, l_start, l_len, l_pid (0: an OFD lock)
        request = struct.pack("hhqqi4x", kind, os.SEEK_SET, uid, 1, 0)
        try:
            fcntl.fcntl(self._lock_fd, fcntl.F_OFD_SETLK, request)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _schedule(self) -> None:
        if self._reclaim is not None and not self._reclaim.done():
            return  # the running pass looks again before it ends (``_dirty``)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a plugin used outside a server): check now
            self._dirty = False
            self._settle(set(self._pending), leftovers(set(self._pending), self.writable))
            return
        self._reclaim = loop.create_task(self._reclaim_soon(), name="job-uid-reclaim")

    async def _reclaim_soon(self) -> None:
        await asyncio.sleep(RECLAIM_DELAY)
        while self._dirty:
            self._dirty = False
            candidates = set(self._pending)
            held = await asyncio.to_thread(leftovers, candidates, self.writable)
            self._settle(candidates, held)

    def _settle(self, candidates: set[int], held: dict[int, str]) -> None:
        """On the loop: uids of ``candidates`` that hold nothing go back to the pool."""
        for uid in sorted(candidates - held.keys()):
            self._pending.discard(uid)
            self._reported.discard(uid)
            if self._lock_fd >= 0:
                self._lock(uid, fcntl.F_UNLCK)
            self._free.append(uid)
        for uid, what in held.items():
            if uid not in self._reported:
                self._reported.add(uid)
                log.warning("job_uid_kept", uid=uid, holds=what, reason="not reused while so")

"""Usage over time, as every part of jobworker sees it: samples, a job's samples, the ring
that keeps them, and the protocols of who measures (:mod:`jobworker.backends.local.sampling`
takes the samples on a host).

Each job keeps a :class:`UsageRing` of at most :data:`RING_SIZE` samples, kept with the job
until it is evicted. When the ring is full it drops every other sample and from then on
keeps one sample in two (then four, ...): the ring always covers the job's whole life, at a
resolution that halves as it ages, and never grows. The newest sample is always kept too,
so rates (CPU %, IO bytes/s) use the last second.

Memory: a sample is 7 machine words in an ``array`` (56 bytes); a ring is at most
``RING_SIZE * 56`` = 13.4 KiB, so ``--max-jobs 1000`` running plus ``--retain-jobs 1000``
retained cost at most 27 MiB.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

#: Samples kept per job (see the module docstring for how older ones thin out).
RING_SIZE = 240

_FIELDS = 7
_NONE = -1


@attrs.frozen
class UsageSample:
    """What a job used at ``time`` (Unix seconds): counters since it started, gauges now."""

    time: float
    cpu_usec: int
    #: None where it cannot be read (a cgroup without the memory or pids controller).
    memory_bytes: int | None
    pids: int | None
    memory_peak_bytes: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None

    def _pack(self) -> tuple[int, ...]:
        def opt(v: int | None) -> int:
            return _NONE if v is None else v

        return (
            int(self.time * 1000),
            self.cpu_usec,
            opt(self.memory_bytes),
            opt(self.pids),
            opt(self.memory_peak_bytes),
            opt(self.io_read_bytes),
            opt(self.io_write_bytes),
        )

    @classmethod
    def _unpack(cls, raw: Sequence[int]) -> UsageSample:
        def opt(v: int) -> int | None:
            return None if v == _NONE else v

        return cls(
            raw[0] / 1000, raw[1], opt(raw[2]), opt(raw[3]), opt(raw[4]), opt(raw[5]), opt(raw[6])
        )


@attrs.frozen
class JobUsage:
    """A job's samples, oldest first, and where they come from ("cgroupv2", "proc")."""

    job_id: str
    source: str
    samples: tuple[UsageSample, ...]


@runtime_checkable
class SelfSampling(Protocol):
    """A containment that measures its own processes (the cgroupv2 plugin's cgroup)."""

    def sample_usage(self) -> UsageSample | None:
        """The job's usage now, or None once it is gone. Called in a worker thread."""


@runtime_checkable
class UsageSource(Protocol):
    """A job backend that samples usage: the local
    :class:`jobworker.backends.local.manager.JobManager`, and
    the Ray backend (:class:`jobworker.backends.ray.front.RayBackend`), which asks the node
    agents' managers -- hence async."""

    async def usage(self, job_id: str, last: int = 0) -> JobUsage:
        """The job's samples (the newest ``last`` only, 0: all); NotFound if unknown."""

    async def running_usage(self, last: int = 0) -> list[JobUsage]:
        """Samples of every running job (of every reachable node, on a cluster)."""


class UsageRing:
    """At most ``capacity`` samples covering a job's whole life (see the module docstring)."""

    def __init__(self, capacity: int = RING_SIZE) -> None:
        self._capacity = capacity
        self._data = array.array("q")
        self._stride = 1
        self._skipped = 0
        self.latest: UsageSample | None = None
        self.previous: UsageSample | None = None

    def __len__(self) -> int:
        return len(self._data) // _FIELDS

    def add(self, sample: UsageSample) -> None:
        self.previous, self.latest = self.latest, sample
        self._skipped += 1
        if self._skipped < self._stride and len(self):
            return
        self._skipped = 0
        if len(self) >= self._capacity:
            self._thin()
        self._data.extend(sample._pack())

    def _thin(self) -> None:
        kept = array.array("q")
        for i in range(0, len(self), 2):
            kept.extend(self._data[i * _FIELDS : (i + 1) * _FIELDS])
        self._data = kept
        self._stride *= 2

    def samples(self, last: int = 0) -> tuple[UsageSample, ...]:
        """Oldest first, the newest always included; ``last`` > 0: only that many."""
        newest = [s for s in (self.previous, self.latest) if s is not None]
        kept = {s._pack() for s in newest}
        data = self._data
        out = [
            UsageSample._unpack(raw)
            for raw in (tuple(data[i : i + _FIELDS]) for i in range(0, len(data), _FIELDS))
            if raw not in kept
        ]
        out.extend(newest)
        return tuple(out[-last:] if last > 0 else out)

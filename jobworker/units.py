"""Parsing the quantities people type on the command line: sizes, rates, device limits.

Units are binary (K = 1024) because the kernel's cgroup files count bytes in powers of
two, and ``--memory 1G`` should mean what ``memory.max`` will show.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?:(?P<unit>[kmgt])(?:i?b)?|b?)", re.IGNORECASE)
_MULTIPLIERS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_PER_SECOND = "/s"

#: cgroup v2's ``cpu.weight``: what ``--cpu-weight`` may be (``jobspec.Limits`` checks it;
#: here, so that the CLI states it without importing the model).
CPU_WEIGHT_RANGE = (1, 10_000)


def parse_size(text: str) -> int:
    """Bytes from ``512K``, ``256M``, ``1.5G``, ``1GiB`` or plain ``1048576``; must be > 0."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: use a number with an optional K, M, G or T suffix "
            "(binary units), e.g. 256M"
        )
    value = int(float(match["number"]) * _MULTIPLIERS[(match["unit"] or "").lower()])
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be at least one byte")
    return value


def format_size(value: int) -> str:
    """The shortest exact form :func:`parse_size` reads back: ``1G``, ``256M``, ``1000``."""
    for unit in "TGMK":
        if value and value % _MULTIPLIERS[unit.lower()] == 0:
            return f"{value // _MULTIPLIERS[unit.lower()]}{unit}"
    return str(value)


def parse_rate(text: str) -> int:
    """Bytes per second from a size, optionally written with ``/s`` (``10M``, ``10M/s``)."""
    stripped = text.strip()
    if stripped.lower().endswith(_PER_SECOND):
        stripped = stripped[: -len(_PER_SECOND)]
    try:
        return parse_size(stripped)
    except ValueError:
        raise ValueError(
            f"invalid rate {text!r}: use bytes per second with an optional K, M, G or T "
            "suffix (binary units), e.g. 10M"
        ) from None


def parse_count(text: str) -> int:
    """A whole number greater than zero (pids, IO operations per second)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"invalid number {text!r}: expected a whole number, e.g. 100") from None
    if value <= 0:
        raise ValueError(f"invalid number {text!r}: must be greater than zero")
    return value


def parse_cores(text: str) -> float:
    """CPU cores as a positive decimal (``0.5`` is half a core)."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"invalid CPU amount {text!r}: expected cores, e.g. 0.5") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"invalid CPU amount {text!r}: must be a positive number of cores")
    return value


def split_device_value(text: str) -> tuple[str, str]:
    """Split ``DEV=VALUE``; DEV is a block device path or ``MAJ:MIN``, passed on as given."""
    device, sep, value = text.rpartition("=")
    if not sep or not device or not value:
        raise ValueError(f"invalid device limit {text!r}: expected DEV=VALUE, e.g. /dev/sda=10M")
    return device, value


def parse_seconds(text: str) -> float:
    """A duration in seconds, zero or more (``0`` means no grace: SIGKILL at once)."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: expected seconds, e.g. 10 or 2.5") from None
    if not 0 <= value < float("inf"):
        raise ValueError(f"invalid duration {text!r}: must be zero or more seconds")
    return value

"""Giving freed output buffers back to the system once followers have gone.

Every chunk in flight to a follower is a 64-256 KiB buffer. glibc serves buffers that size
from its heap once one was freed (its mmap threshold rises), and a heap keeps its pages:
500 stalled followers left the server at 700 MiB after they went (docs/performance.md,
"Stalled followers"). ``malloc_trim`` returns the free pages; it is called a moment after
a stream ends, at most once a second, so a busy stream never pays for it. Without glibc
(musl), nothing to do.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable

#: How long after a stream ends the trim runs (more streams ending meanwhile share it).
TRIM_DELAY = 1.0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()
_pending: set[asyncio.AbstractEventLoop] = set()


def trim_soon() -> None:
    """Return free heap pages to the system in :data:`TRIM_DELAY` seconds (on the loop)."""
    if _TRIM is None:
        return
    loop = asyncio.get_running_loop()
    if loop in _pending:
        return
    _pending.add(loop)
    loop.call_later(TRIM_DELAY, _trim, loop)


def _trim(loop: asyncio.AbstractEventLoop) -> None:
    _pending.discard(loop)
    if _TRIM is not None:
        _TRIM(0)

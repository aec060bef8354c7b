"""Logging set-up: structlog, configured once by the CLI entry point (never at import).

JSON lines when stderr is not a terminal (for collectors), a readable console format on
one. Context bound with ``structlog.contextvars`` (the RPC, the caller's identity, the job
id) is merged into every event.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import sys
import threading
from datetime import UTC, datetime

import structlog

from jobworker.errors import ConfigError

LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Send jobworker's events to stderr at ``level`` and above.

    ``json`` None picks JSON unless stderr is a TTY. Raises ``ConfigError`` for an unknown
    level.
    """
    if level.lower() not in LEVELS:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[structlog.typing.Processor]
    if json:
        renderer = [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer()]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


#: A line of Ray's C++ core: ``[2026-12-06 06:03:41,950 E 9387 9425] file.h:204: text``.
_NATIVE_LINE = re.compile(rb"^\[\S+ \S+ ([DIWEF]) \d+ \d+\] ")
_NATIVE_LEVELS = {b"D": "debug", b"I": "info", b"W": "warning", b"E": "error", b"F": "critical"}
#: A partial line longer than this is written out as a record of its own.
_LINE_MAX = 64 * 1024
#: How long the exit waits for the last lines to be written.
_DRAIN_SECONDS = 2.0


class ForeignLines:
    """Keeps a JSON log all JSON lines when native code in the process writes plain text
    to stderr (Ray's C++ core does, and no setting stops it): file descriptor 2 becomes a
    pipe, and a thread copies each line to the real stderr, JSON lines as they are and any
    other line as an ``event`` record with the text in ``message`` (its level read from a
    Ray prefix, else warning). Nothing is dropped: :meth:`close` (at exit) puts the real
    stderr back and writes what the pipe still holds."""

    def __init__(self, event: str) -> None:
        self._event = event
        self._real = os.dup(2)
        read, write = os.pipe()
        with contextlib.suppress(OSError):  # a larger pipe: a burst does not block writers
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 1 << 20)
        os.dup2(write, 2)
        os.close(write)
        self._read = read
        self._thread = threading.Thread(target=self._copy, name="stderr-lines", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        pending = b""
        while data := os.read(self._read, 1 << 16):
            pending += data
            *lines, pending = pending.split(b"\n")
            if len(pending) > _LINE_MAX:
                lines, pending = [*lines, pending], b""
            self._write(b"".join(self._record(line) for line in lines if line))
        if pending:
            self._write(self._record(pending))
        os.close(self._read)

    def _record(self, line: bytes) -> bytes:
        if line.startswith(b"{"):
            with contextlib.suppress(ValueError):
                if isinstance(json.loads(line), dict):
                    return line + b"\n"
        native = _NATIVE_LINE.match(line)
        record = {
            "event": self._event,
            "message": line.decode(errors="replace"),
            "level": _NATIVE_LEVELS[native.group(1)] if native else "warning",
            "timestamp": datetime.now(UTC).isoformat(),
        }
        return json.dumps(record).encode() + b"\n"

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._real, view) :]

    def close(self) -> None:
        """Put the real stderr back, and write out what the pipe still holds (the pipe
        ends once no process holds its write end: a child that inherited it may keep it
        open, hence the bound)."""
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(self._real, 2)
        self._thread.join(_DRAIN_SECONDS)


def keep_stderr_json(event: str) -> ForeignLines | None:
    """Wrap other writers' lines on stderr (:class:`ForeignLines`) where the log is JSON
    (stderr not a terminal), until exit."""
    if sys.stderr.isatty():
        return None
    lines = ForeignLines(event)
    atexit.register(lines.close)
    return lines

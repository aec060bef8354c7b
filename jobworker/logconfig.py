"""Logging set-up: structlog, configured once by the CLI entry point (never at import).

JSON lines when stderr is not a terminal (for collectors), a readable console format on
one. Context bound with ``structlog.contextvars`` (the RPC, the caller's identity, the job
id) is merged into every event.
"""

from __future__ import annotations

import logging
import sys

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

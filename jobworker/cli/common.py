"""What the command modules share: the parser, option types, output and exit statuses."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from jobworker.errors import UsageError

EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
#: ``run`` and ``start`` of a command the server cannot execute: a shell's statuses.
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, not usage plus message."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Adapt a ``units`` parser for ``type=``: argparse shows only ArgumentTypeError text."""

    @functools.wraps(parse)
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def for_terminal(text: str) -> str:
    """``text`` with every character that is not printable (escape sequences, bell,
    newlines, NUL, bidi controls...) written as a Python escape such as ``\\x1b``.

    Everything the CLI prints for people goes through it: a job's arguments or a server's
    message must not rewrite the reader's terminal. JSON output and a job's own output
    (``logs``, ``run``) are not for this.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def say(message: str) -> None:
    print(f"jobworker: {for_terminal(message)}", file=sys.stderr, flush=True)


def print_json(data: Any) -> None:
    import json  # only the commands' --json need it

    print(json.dumps(data, indent=2))


def silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the exit-time flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)

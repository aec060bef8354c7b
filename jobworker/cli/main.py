"""The entry point: the whole parser, loading ``serve``'s plugins first, and ``main``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jobworker import __version__
from jobworker.cli import admin, client
from jobworker.cli import serve as serve_command
from jobworker.cli.common import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_SERVER_ERROR,
    EXIT_USAGE,
    Parser,
    say,
    silence_stdout,
)
from jobworker.errors import JobworkerError
from jobworker.hooks.host import Plugins


def build_parser(plugins: Plugins) -> argparse.ArgumentParser:
    """The whole command line; ``plugins`` (already loaded) add their ``serve`` options."""
    parser = Parser(prog="jobworker", description="Run Linux commands on a jobworker server.")
    parser.add_argument("--version", action="version", version=f"jobworker {__version__}")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    serve_command.add_command(commands, plugins)
    client.add_commands(commands)
    admin.add_commands(commands)
    return parser


def _preload_plugins(argv: Sequence[str]) -> Plugins:
    """Phase one of parsing ``serve``: load the plugins it names, so that phase two can
    parse the options they add."""
    plugins = Plugins()
    if next((arg for arg in argv if not arg.startswith("-")), None) != "serve":
        return plugins
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--plugin", action="append", default=[])
    names: list[str] = finder.parse_known_args(argv)[0].plugin
    plugins.load_for_server(names)
    return plugins


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``jobworker`` command; return its exit status (never raises)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        plugins = _preload_plugins(args)
        options = build_parser(plugins).parse_args(args)
        status: int = options.handler(options)
        return status
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except JobworkerError as err:  # raised here, not by the server: usage or configuration
        say(f"error: {err}")
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as err:  # a file or directory we were told to use
        where = f"{err.filename}: " if err.filename else ""
        say(f"error: {where}{err.strerror or err}")
    except Exception as err:  # a bug: still one line, no traceback (see errors.py)
        say(f"INTERNAL: unexpected {type(err).__name__}: {err}")
        return EXIT_SERVER_ERROR
    return EXIT_USAGE

"""The entry point: the parser (the one client command run, alone; every command, with
``serve``'s plugins loaded first, otherwise) and ``main``."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from jobworker import __version__
from jobworker.cli import client
from jobworker.cli.common import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_SERVER_ERROR,
    EXIT_USAGE,
    Parser,
    say,
    silence_stdout,
)
from jobworker.errors import JobworkerError, UsageError

if TYPE_CHECKING:
    from jobworker.hooks.host import Plugins


def build_parser(plugins: Plugins | None) -> argparse.ArgumentParser:
    """The whole command line; ``plugins`` (already loaded) add their ``serve`` options.

    With ``plugins`` None, the client commands alone: what they import stays what a
    connection needs, without the plugin host (pluggy, ``importlib.metadata``), the PKI
    (``cryptography``) or the server's logging (``structlog``); docs/performance.md.
    """
    return _parser(plugins, client.NAMES)


def reference_parser() -> argparse.ArgumentParser:
    """Every command, ``serve`` with the options of every built-in plugin that loads here
    (``metrics`` needs its extra): what shell completion and the man page describe."""
    from jobworker.errors import ConfigError
    from jobworker.hooks.host import BUILTIN_PLUGINS, Plugins

    plugins = Plugins()
    for name in BUILTIN_PLUGINS:
        try:
            plugins.load([name])
        except ConfigError:
            pass  # a plugin that cannot load here adds no option here either
    return build_parser(plugins)


def _parser(plugins: Plugins | None, client_commands: Sequence[str]) -> argparse.ArgumentParser:
    """:func:`build_parser`, with only ``client_commands`` of the client commands."""
    parser = Parser(prog="jobworker", description="Run Linux commands on a jobworker server.")
    parser.add_argument("--version", action="version", version=f"jobworker {__version__}")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    if plugins is not None:
        from jobworker.cli import serve

        serve.add_command(commands, plugins)
    client.add_commands(commands, client_commands)
    if plugins is not None:
        from jobworker.cli import admin

        admin.add_commands(commands)
    return parser


def _command_line(args: Sequence[str]) -> argparse.ArgumentParser:
    """The parser ``args`` need: the one client command they run, when they run one."""
    command = _subcommand(args)
    if command in client.NAMES:
        return _parser(None, [command])
    return build_parser(_preload_plugins(args))


def _subcommand(args: Sequence[str]) -> str | None:
    return next((arg for arg in args if not arg.startswith("-")), None)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options_after_the_command(args: list[str]) -> list[str]:
    """docker's habit, ``jobworker --server H run ...``: options of a command given before
    it move after it (after ``certs init``, for a command of a command), where argparse
    reads them. Anything else is left for argparse to refuse. The client commands' parser
    is tried first, so that a client command stays light."""
    if not args or not args[0].startswith("-") or args[0] == "--":
        return args
    moved = _hoist(build_parser(None), args)
    if moved is not None:
        return moved
    from jobworker.hooks.host import Plugins

    return _hoist(build_parser(Plugins()), args) or args


def _hoist(parser: argparse.ArgumentParser, args: list[str]) -> list[str] | None:
    """``args`` with the options before the command moved after it; None unless
    ``parser`` knows every one of them and the command."""
    commands = _subcommands(parser)
    takes_value = {
        flag: action.nargs != 0
        for command in [
            *commands.values(),
            *(s for c in commands.values() for s in _subcommands(c).values()),
        ]
        for flag, action in command._option_string_actions.items()
    }
    index = 0
    while index < len(args) and args[index].startswith("-") and args[index] != "--":
        flag, equals, _value = args[index].partition("=")
        if flag in parser._option_string_actions or flag not in takes_value:
            return None
        index += 2 if takes_value[flag] and not equals else 1
    if index >= len(args) or args[index] not in commands:
        return None
    moved, command, rest = args[:index], args[index], args[index + 1 :]
    if rest and rest[0] in _subcommands(commands[command]):
        return [command, rest[0], *moved, *rest[1:]]
    return [command, *moved, *rest]


def _preload_plugins(argv: Sequence[str]) -> Plugins:
    """Phase one of parsing ``serve``: load the plugins it names, so that phase two can
    parse the options they add."""
    from jobworker.hooks.host import Plugins

    plugins = Plugins()
    if _subcommand(argv) != "serve":
        return plugins
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--plugin", action="append", default=[])
    names: list[str] = finder.parse_known_args(argv)[0].plugin
    plugins.load_for_server(names)
    return plugins


def _dash_dash_hint(parser: argparse.ArgumentParser, args: list[str], error: str) -> str:
    """For ``run ls -l /``: the command's options were read as ours; suggest ``--``."""
    if "unrecognized arguments" not in error or "--" in args:
        return ""
    try:
        options, extra = parser.parse_known_args(args)
    except UsageError:
        return ""
    command = getattr(options, "command", None)
    if not command or options.subcommand not in ("run", "start"):
        return ""
    return f"; put -- before the command: jobworker {options.subcommand} -- " + shlex.join(
        [*command, *extra]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``jobworker`` command; return its exit status (never raises)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _options_after_the_command(args)
        parser = _command_line(args)
        try:
            options = parser.parse_args(args)
        except UsageError as err:
            raise UsageError(f"{err}{_dash_dash_hint(parser, args, str(err))}") from None
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

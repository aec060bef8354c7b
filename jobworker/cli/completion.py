"""``jobworker completion bash|zsh``: a completion script generated from the parser.

`shtab <https://pypi.org/project/shtab/>`_ writes the script from the same parser that
reads the command line (:func:`jobworker.cli.main.reference_parser`), so a new command or
option completes as soon as it exists. Options that take a file or a directory complete
paths; those with choices complete their choices.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SHELLS = ("bash", "zsh")
_DIRECTORIES = frozenset({"DIR", "D"})
_FILES = frozenset({"FILE", "F", "PATH"})


def add_command(commands: Any) -> None:
    parser = commands.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for SHELL. bash: `jobworker completion bash"
        " > /etc/bash_completion.d/jobworker`; zsh: `jobworker completion zsh >"
        ' "${fpath[1]}/_jobworker"`, then start a new shell.',
    )
    parser.add_argument("shell", choices=SHELLS, metavar="SHELL", help=" or ".join(SHELLS))
    parser.set_defaults(handler=_completion)


def script(shell: str) -> str:
    """The completion script of ``jobworker`` for ``shell``."""
    import shtab

    from jobworker.cli.main import reference_parser

    parser = reference_parser()
    for sub in _parsers(parser):
        for action in sub._actions:
            if action.type is Path or action.metavar in _FILES | _DIRECTORIES:
                directory = action.metavar in _DIRECTORIES
                action.complete = shtab.DIRECTORY if directory else shtab.FILE  # type: ignore[attr-defined]
    text: str = shtab.complete(parser, shell)
    return text


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def _completion(options: argparse.Namespace) -> int:
    print(script(options.shell), end="")
    return 0

"""docs/jobworker.1 is the man page generated from the parser, whoever generates it, and
groff reads it without a warning."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobworker.cli.main import reference_parser
from tests.e2e.conftest import clean_env

PAGE = Path(__file__).resolve().parents[2] / "docs" / "jobworker.1"
REGENERATE = "python -m jobworker.cli.manpage > docs/jobworker.1"


def generate(**env: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "jobworker.cli.manpage"],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=60,
        check=True,
    ).stdout


def test_the_committed_page_is_the_generated_one(tmp_path: Path) -> None:
    """Another user, with their own dev PKI and server in the environment, generates
    the very same page."""
    mine = generate()
    theirs = generate(
        HOME=str(tmp_path), JOBWORKER_HOME=str(tmp_path / "pki"), JOBWORKER_SERVER="elsewhere"
    )
    assert mine == theirs
    assert PAGE.read_text() == mine, f"docs/jobworker.1 is stale: run {REGENERATE}"


def _leaves(
    parser: argparse.ArgumentParser, prog: str
) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command that runs something (``certs init``, not ``certs``)."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return [(prog, parser)]
    return [
        leaf
        for name, sub in subparsers[0].choices.items()
        for leaf in _leaves(sub, f"{prog} {name}")
    ]


def test_the_page_has_every_command_and_option() -> None:
    text = PAGE.read_text().replace("\\-", "-")
    commands = _leaves(reference_parser(), "jobworker")
    assert len(commands) > 15
    for prog, parser in commands:
        assert f'.SS "{prog}"' in text, prog
        section = text.split(f'.SS "{prog}"', 1)[1].split(".SS", 1)[0]
        for action in parser._actions:
            if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
                for option in action.option_strings:
                    assert f"\\fB{option}\\fR" in section, f"{prog} {option}"


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
def test_groff_reads_the_page_without_a_warning() -> None:
    result = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(PAGE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")

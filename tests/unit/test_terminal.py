"""``for_terminal``: what the CLI prints for people holds no control character."""

from __future__ import annotations

import pytest

from jobworker.cli.common import for_terminal, say


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("sleep 10", "sleep 10"),
        ("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c"),
        ("\x1b]0;owned\x07\x1b[2J", "\\x1b]0;owned\\x07\\x1b[2J"),
        ("a\nb\tc\rd\0e", "a\\nb\\tc\\rd\\x00e"),
        ("\u202eevil\u2028", "\\u202eevil\\u2028"),
        ("\x9b31m", "\\x9b31m"),  # the 8-bit CSI
    ],
)
def test_for_terminal(text: str, shown: str) -> None:
    assert for_terminal(text) == shown


def test_messages_from_a_server_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    say("NOT_FOUND: job '\x1b[2J' not found\n\x1b]0;owned\x07")
    assert capsys.readouterr().err == (
        "jobworker: NOT_FOUND: job '\\x1b[2J' not found\\n\\x1b]0;owned\\x07\n"
    )

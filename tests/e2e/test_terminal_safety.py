"""What the CLI prints for people cannot drive the reader's terminal: a job's arguments
with escape sequences are shown escaped by ``list``, ``status`` and errors, while
``--json`` and the job's own output stay exact."""

from __future__ import annotations

import json

from tests.e2e.conftest import Cli

HOSTILE = "\x1b]0;owned\x07\x1b[2J\u202eevil\r"
SHOWN = "\\x1b]0;owned\\x07\\x1b[2J\\u202eevil\\r"


def test_list_and_status_escape_control_characters(cli: Cli) -> None:
    job_id = cli.ok("start", "--", "printf", "%s", HOSTILE).strip()
    cli.ok("logs", "--", job_id)
    for args, as_ in ((("list",), "alice"), (("list",), "root"), (("status", job_id), "alice")):
        shown = cli(*args, as_=as_)
        assert shown.returncode == 0, shown.stderr
        text = shown.stdout.decode()
        assert SHOWN in text, text
        assert not any(ch in text for ch in "\x1b\x07\r\u202e"), repr(text)
    # JSON is for programs: the exact string, as JSON escapes it.
    status = json.loads(cli.ok("status", "--json", "--", job_id))
    assert status["args"] == ["%s", HOSTILE]
    # The job's own output is its bytes, untouched.
    assert cli("logs", "--", job_id).stdout == HOSTILE.encode()

"""An argument that is not UTF-8 is refused by the client, in one line saying why."""

from __future__ import annotations

import os
import subprocess

from tests.e2e.conftest import JOBWORKER, Cli


def test_a_non_utf8_argument_is_refused_with_the_reason(cli: Cli) -> None:
    # Bytes, as a shell passes them: Python sees the 0xff as a lone surrogate.
    result = subprocess.run(
        [os.fsencode(JOBWORKER), b"run", b"--", b"echo", b"a\xffb"],
        capture_output=True,
        env=cli.env("alice"),
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        b"jobworker: INVALID_ARGUMENT: argument 1 holds bytes that are not UTF-8 (ff at"
        b" character 2): the API carries text as protobuf strings, which are UTF-8; pass the"
        b" value through a file, or encode it (base64, say) for the job to decode\n"
    )


def test_a_non_utf8_environment_value_is_refused(cli: Cli) -> None:
    result = subprocess.run(
        [os.fsencode(JOBWORKER), b"start", b"--env", b"X=\xfe", b"--", b"true"],
        capture_output=True,
        env=cli.env("alice"),
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(
        b"jobworker: INVALID_ARGUMENT: environment variable X holds bytes that are not UTF-8"
    )

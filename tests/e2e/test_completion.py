"""``jobworker completion bash|zsh`` through the real CLI: the script completes the
parser's commands and options in a real bash, and zsh reads it without a syntax error."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from jobworker.cli.main import reference_parser
from tests.e2e.conftest import clean_env, jobworker

#: Complete the words given (the last one being typed) the way bash calls the function.
COMPLETE = """
source "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
COMPREPLY=()
_shtab_jobworker "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
printf '%s\\n' "${COMPREPLY[@]}"
"""


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = jobworker("completion", "bash", env=clean_env())
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("completion") / "jobworker.bash"
    path.write_bytes(result.stdout)
    return path


def complete(script: Path, *words: str) -> list[str]:
    result = subprocess.run(
        ["bash", "-c", COMPLETE, "bash", str(script), "jobworker", *words],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stderr == ""
    return result.stdout.split()


def test_bash_completes_commands_options_and_choices(bash_script: Path) -> None:
    assert complete(bash_script, "cer") == ["certs"]
    assert complete(bash_script, "certs", "") == [
        "init",
        "add-client",
        "revoke",
        "renew-server",
        "list",
        "crl",
    ]
    assert complete(bash_script, "run", "--mem") == ["--memory", "--memory-high"]
    assert complete(bash_script, "list", "--state", "") == ["running", "exited"]
    assert complete(bash_script, "completion", "") == ["bash", "zsh"]
    # serve's plugin options are there too.
    assert "--cgroup-root" in complete(bash_script, "serve", "--cgroup")


def test_the_script_names_every_command_of_the_parser(bash_script: Path) -> None:
    listed = re.search(r"^_shtab_jobworker_subparsers=\((.*)\)$", bash_script.read_text(), re.M)
    assert listed is not None
    parser = reference_parser()
    commands = next(a for a in parser._actions if a.dest == "subcommand").choices
    assert listed.group(1).split() == list(commands)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh")
def test_zsh_reads_its_script(tmp_path: Path) -> None:
    result = jobworker("completion", "zsh", env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"#compdef jobworker")
    path = tmp_path / "_jobworker"
    path.write_bytes(result.stdout)
    checked = subprocess.run(["zsh", "-n", str(path)], capture_output=True, timeout=30, check=False)
    assert (checked.returncode, checked.stderr) == (0, b"")


def test_an_unknown_shell_is_refused() -> None:
    result = jobworker("completion", "fish", env=clean_env())
    assert result.returncode == 2
    assert b"invalid choice: 'fish'" in result.stderr

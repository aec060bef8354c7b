"""The man page, ``jobworker(1)``, generated from the parser: every command and option
with its help, then the environment, exit statuses and files.

``python -m jobworker.cli.manpage > docs/jobworker.1`` regenerates the committed page;
tests/e2e/test_manpage.py fails when it is stale. The page must not depend on who
generates it, so the dev PKI directory is written as its default for everyone
(``~/.local/share/jobworker/pki``) and no ``JOBWORKER_*`` variable is read.
"""

from __future__ import annotations

import argparse
import os
import sys

from jobworker import __version__

_ENVIRONMENT = (
    (
        "JOBWORKER_SERVER",
        "The server a client command dials, HOST[:PORT], or several IP addresses, comma"
        "-separated (--server).",
    ),
    (
        "JOBWORKER_SERVER_NAME",
        "The name the server's certificate must list, if not the host dialled (--server-name).",
    ),
    ("JOBWORKER_TLS_CERT", "The client certificate (--tls-cert)."),
    ("JOBWORKER_TLS_KEY", "The client certificate's private key (--tls-key)."),
    ("JOBWORKER_TLS_CA", "The CA bundle the server certificate must be signed by (--tls-ca)."),
    ("JOBWORKER_AUTHZ", "The whitelist of serve (--authz)."),
    (
        "JOBWORKER_HOME",
        "The dev PKI directory; else $XDG_DATA_HOME/jobworker/pki, else"
        " ~/.local/share/jobworker/pki.",
    ),
)
_EXIT_STATUS = (
    ("0", "Success."),
    ("1", "The server refused or failed the request, or could not be reached."),
    ("2", "A usage or local configuration error."),
    ("126", "run, start: the command exists on the server but cannot be executed."),
    ("127", "run, start: the command does not exist on the server."),
    ("130", "Interrupted (Ctrl-C); run stops its job first."),
    ("141", "Standard output was closed (broken pipe)."),
)
_SEE_ALSO = (
    "The documentation in the source tree: docs/cli.md (every command), "
    "docs/troubleshooting.md (every error message), docs/certificates.md, docs/install.md, "
    "docs/security.md."
)


def _bold(option: str) -> str:
    return "\\fB" + _roff(option) + "\\fR"


def _roff(text: str) -> str:
    """``text`` for roff: backslashes escaped, hyphens as ``\\-`` (options stay whole, never
    broken across lines, and copy as ASCII)."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _option(action: argparse.Action) -> str:
    """``\\fB\\-\\-cpu\\fR \\fICORES\\fR``: the option's names, then its argument."""
    names = ", ".join(_bold(name) for name in action.option_strings)
    if not action.option_strings:
        return f"\\fI{_roff(str(action.metavar or action.dest))}\\fR"
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    return f"{names} \\fI{_roff(str(metavar))}\\fR"


def _section(parser: argparse.ArgumentParser, title: str) -> list[str]:
    formatter = argparse.HelpFormatter(parser.prog)
    usage = " ".join(parser.format_usage().removeprefix("usage: ").split()).replace(" [-h]", "")
    lines = [f'.SS "{_roff(title)}"', _roff(usage)]
    if parser.description:
        lines += [".PP", _roff(" ".join(parser.description.split()))]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(
            action, argparse._HelpAction | argparse._SubParsersAction | argparse._VersionAction
        ):
            continue
        expanded = formatter._expand_help(action) if action.help else ""
        lines += [".TP", _option(action), _roff(" ".join(expanded.split()))]
    return lines


def _commands(
    parser: argparse.ArgumentParser, prog: str
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((f"{prog} {name}", sub))
                found += _commands(sub, f"{prog} {name}")
    return found


def manpage(parser: argparse.ArgumentParser) -> str:
    """The roff source of jobworker(1) for ``parser`` (the reference parser)."""
    lines = [
        f'.TH JOBWORKER 1 "" "jobworker {__version__}" "User Commands"',
        ".nh",
        ".SH NAME",
        "jobworker \\- run Linux commands on a jobworker server",
        ".SH SYNOPSIS",
        "\\fBjobworker\\fR [\\fB\\-\\-version\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        _roff(" ".join((parser.description or "").split())),
        "\\fBjobworker serve\\fR runs the server; every other command except \\fBplugins\\fR,"
        " \\fBcerts\\fR and \\fBcompletion\\fR is a client of a server, over mutual TLS."
        " A command's options may also come before the command"
        " (\\fBjobworker \\-\\-server\\fR \\fIHOST\\fR \\fBrun \\-\\-\\fR \\fICMD\\fR).",
        ".SH COMMANDS",
    ]
    for title, sub in _commands(parser, "jobworker"):
        if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            lines += _section(sub, title)
    lines.append(".SH ENVIRONMENT")
    for name, meaning in _ENVIRONMENT:
        lines += [".TP", f"\\fB{name}\\fR", _roff(meaning)]
    lines.append(".SH EXIT STATUS")
    lines += [
        ".TP",
        "\\fIthe job's\\fR",
        "run exits with the job's own status (128+N after signal N).",
    ]
    for status, meaning in _EXIT_STATUS:
        lines += [".TP", f"\\fB{status}\\fR", _roff(meaning)]
    lines += [".SH SEE ALSO", _roff(_SEE_ALSO), ""]
    return "\n".join(lines)


def main() -> None:
    for name in [name for name in os.environ if name.startswith("JOBWORKER_")]:
        del os.environ[name]
    os.environ["JOBWORKER_HOME"] = "~/.local/share/jobworker/pki"  # the default, for all

    from jobworker.cli.main import reference_parser

    sys.stdout.write(manpage(reference_parser()))


if __name__ == "__main__":
    main()

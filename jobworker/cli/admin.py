"""The local commands: ``plugins`` (what a server would load), ``certs`` (a PKI) and
``completion`` (a shell's completion script)."""

from __future__ import annotations

import argparse
from typing import Any

from jobworker.cli import certs, completion
from jobworker.cli.common import for_terminal, print_json
from jobworker.errors import ConfigError
from jobworker.hooks.host import Plugins, available_plugins


def add_commands(commands: Any) -> None:
    """Add the local commands to ``commands`` (the subparsers of ``jobworker``)."""
    plugins_cmd = commands.add_parser(
        "plugins",
        help="list plugins",
        description="Without --plugin: every available plugin (built-ins and installed "
        "entry points). With: those `serve --plugin ...` would load (authz and the given "
        "ones).",
    )
    plugins_cmd.add_argument("--plugin", action="append", default=[], metavar="NAME")
    plugins_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    plugins_cmd.set_defaults(handler=_plugins)

    certs.add_command(commands)
    completion.add_command(commands)


def _plugins(options: argparse.Namespace) -> int:
    """Describe plugins without starting anything; one broken plugin does not hide the rest."""
    plugins = Plugins()
    rows: list[dict[str, Any]] = []
    if options.plugin:
        plugins.load_for_server(options.plugin)
    else:
        for name in available_plugins():
            try:
                plugins.load([name])
            except ConfigError as err:
                rows.append({"name": name, "version": None, "hooks": [], "error": str(err)})
    rows = plugins.describe() + rows
    if options.json:
        print_json(rows)
        return 0
    for row in rows:
        details = row.get("error") or row.get("description") or "(no description)"
        print(for_terminal(f"{row['name']} {row['version'] or '-'}: {details}"))
        if row["hooks"]:
            print(for_terminal(f"    hooks: {', '.join(row['hooks'])}"))
    return 0

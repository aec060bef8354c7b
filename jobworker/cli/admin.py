"""The local commands: ``plugins`` (what a server would load) and ``certs init`` (a dev PKI)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from jobworker.api.pki import DEV_CLIENT, PkiPaths, default_pki_dir, init_pki
from jobworker.api.wire import DEFAULT_ADDRESS
from jobworker.cli.common import argument, for_terminal, print_json
from jobworker.errors import ConfigError
from jobworker.hooks.host import Plugins, available_plugins
from jobworker.plugins.authz import ROLES


def _client_role(text: str) -> tuple[str, str]:
    name, _, role = text.partition(":")
    role = role or "user"
    if not name or role not in ROLES:
        raise ValueError(
            f"invalid client {text!r}: expected NAME or NAME:ROLE, ROLE one of {ROLES}"
        )
    return name, role


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

    certs = commands.add_parser("certs", help="manage a dev PKI")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    init = certs_commands.add_parser(
        "init",
        help="create a CA, server and client certificates and authz.toml",
        description="Create (or complete) a dev PKI; existing files are kept.",
    )
    init.add_argument("--dir", type=Path, default=default_pki_dir(), help="default %(default)s")
    init.add_argument(
        "--client",
        action="append",
        type=argument(_client_role),
        default=[],
        metavar="NAME[:ROLE]",
        help=f"a client certificate; ROLE is {' or '.join(ROLES)} (default user); "
        f"default: {DEV_CLIENT}:admin",
    )
    init.set_defaults(handler=_certs_init)


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


def _certs_init(options: argparse.Namespace) -> int:
    clients: list[tuple[str, str]] = options.client or [(DEV_CLIENT, "admin")]
    paths = init_pki(options.dir, clients=clients)
    out = sys.stdout
    print(f"dev PKI in {paths.directory}:", file=out)
    for label, files in (("created", paths.created), ("kept", paths.existing)):
        for path in files:
            print(f"  {label:8}{path}", file=out)
    if paths.authz in paths.existing:
        names = ", ".join(name for name, _role in clients)
        print(f"  note: {paths.authz} was kept as it is; check it lists {names}", file=out)
    _print_usage(paths, clients, out)
    return 0


def _print_usage(paths: PkiPaths, clients: Sequence[tuple[str, str]], out: IO[str]) -> None:
    q = shlex.quote
    server = paths.server()
    print("\nstart the server:", file=out)
    print(
        f"  jobworker serve --tls-cert {q(str(server.cert))} --tls-key {q(str(server.key))} "
        f"--tls-ca {q(str(server.ca))} --authz {q(str(paths.authz))}",
        file=out,
    )
    for name, role in clients:
        files = paths.client(name)
        print(f"\nconnect as {name} ({role}):", file=out)
        print(
            f"  export JOBWORKER_SERVER={DEFAULT_ADDRESS} JOBWORKER_TLS_CERT={q(str(files.cert))} "
            f"JOBWORKER_TLS_KEY={q(str(files.key))} JOBWORKER_TLS_CA={q(str(files.ca))}",
            file=out,
        )

"""``jobworker certs``: make a PKI, then keep it (docs/certificates.md).

``init`` makes the CA, the server certificate, the first clients, their whitelist and an
empty CRL; ``add-client``, ``revoke``, ``renew-server`` and ``crl`` change them later.
Each command ends with the next step, in words an operator can paste: a change reaches a
running server only when it re-reads its files (SIGHUP).
"""

from __future__ import annotations

import argparse
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jobworker.api import certs
from jobworker.api.address import DEFAULT_ADDRESS, DEFAULT_PORT, with_default_port
from jobworker.api.pki import CRL_VALIDITY, PkiPaths, default_server_names, init_pki
from jobworker.api.tlsfiles import DEV_CLIENT, TlsFiles, default_pki_dir
from jobworker.cli.common import argument, for_terminal, print_json
from jobworker.plugins.authz import ROLES

_RELOAD = (
    "make the running server read its files again: kill -HUP <server pid>"
    " (systemctl reload jobworker under systemd)"
)


def _client_role(text: str) -> tuple[str, str]:
    name, _, role = text.partition(":")
    role = role or "user"
    if not name or role not in ROLES:
        raise ValueError(
            f"invalid client {text!r}: expected NAME or NAME:ROLE, ROLE one of {ROLES}"
        )
    return name, role


def add_command(commands: Any) -> None:
    """Add ``certs`` and its commands to ``commands`` (the subparsers of ``jobworker``)."""
    parser = commands.add_parser(
        "certs",
        help="make and keep the certificates, the whitelist and the CRL",
        description="A PKI in one directory: a CA, the server certificate, client "
        "certificates, authz.toml and ca.crl (docs/certificates.md).",
    )
    subcommands = parser.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str, handler: Any) -> Any:
        sub = subcommands.add_parser(name, help=help, description=description)
        sub.add_argument(
            "--dir",
            type=_absolute,
            default=default_pki_dir(),
            help="the PKI (default %(default)s)",
        )
        sub.set_defaults(handler=handler)
        return sub

    init = command(
        "init",
        "create a CA, server and client certificates, authz.toml and ca.crl",
        "Create (or complete) a PKI; existing files are kept.",
        _init,
    )
    init.add_argument(
        "--client",
        action="append",
        type=argument(_client_role),
        default=[],
        metavar="NAME[:ROLE]",
        help=f"a client certificate; ROLE is {' or '.join(ROLES)} (default user); "
        f"default: {DEV_CLIENT}:admin",
    )
    _server_name_options(init, "default: localhost, the loopback addresses and the host name")
    add = command(
        "add-client",
        "issue a client certificate and whitelist it",
        "Issue NAME's certificate and add NAME with ROLE to authz.toml.",
        _add_client,
    )
    add.add_argument(
        "client",
        type=argument(_client_role),
        metavar="NAME[:ROLE]",
        help=f"ROLE is {' or '.join(ROLES)} (default user)",
    )
    revoke = command(
        "revoke",
        "revoke a client certificate (updates ca.crl)",
        "Add NAME's certificate to ca.crl and move its files to revoked/.",
        _revoke,
    )
    revoke.add_argument("name", metavar="NAME", help="the client, as add-client or init named it")
    renew = command(
        "renew-server",
        "issue a new server certificate and key",
        "Replace server.pem and server-key.pem with new ones from the same CA.",
        _renew_server,
    )
    _server_name_options(renew, "default: the names of the certificate replaced")
    listing = command(
        "list",
        "show the server and client certificates, their roles, expiry and revocation",
        "Show who holds a certificate of this PKI, with which role, until when, and what"
        " the CRL revokes.",
        _list,
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    command(
        "crl",
        "re-sign ca.crl before it expires",
        f"Re-sign ca.crl, with every revoked certificate, for {CRL_VALIDITY.days} days.",
        _crl,
    )


def _absolute(text: str) -> Path:
    """Printed paths must work from any directory: they end up in exports and unit files."""
    return Path(text).absolute()


def _server_name_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--host",
        action="append",
        type=argument(certs.host_name),
        default=[],
        metavar="NAME",
        help=f"a DNS name clients dial the server by (repeatable; {default})",
    )
    parser.add_argument(
        "--ip",
        action="append",
        type=argument(certs.ip_address),
        default=[],
        metavar="ADDR",
        help="an IP address clients dial the server at (repeatable)",
    )


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def _date(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _export(address: str, files: TlsFiles) -> str:
    return (
        f"  export JOBWORKER_SERVER={address} JOBWORKER_TLS_CERT={_q(files.cert)} "
        f"JOBWORKER_TLS_KEY={_q(files.key)} JOBWORKER_TLS_CA={_q(files.ca)}"
    )


def _server_address(paths: PkiPaths) -> str:
    """What a client dials: the first name of the server certificate, unless it has the
    default names (then the server's default address)."""
    names = certs.certificate_names(paths.server_cert)
    return DEFAULT_ADDRESS if names == default_server_names() else with_default_port(names[0])


def _init(options: argparse.Namespace) -> int:
    clients: list[tuple[str, str]] = options.client or [(DEV_CLIENT, "admin")]
    names = [*options.host, *options.ip]
    paths = init_pki(options.dir, clients=clients, server_names=names or None)
    print(f"PKI in {paths.directory}:")
    for label, files in (("created", paths.created), ("kept", paths.existing)):
        for path in files:
            print(f"  {label:8}{path}")
    if paths.authz in paths.existing:
        listed = ", ".join(name for name, _role in clients)
        print(f"  note: {paths.authz} was kept as it is; check it lists {listed}")
        print("        (`jobworker certs add-client NAME:ROLE` adds a client to it)")
    kept_names = certs.certificate_names(paths.server_cert)
    if names and paths.server_cert in paths.existing and kept_names != names:
        print(
            f"  note: {paths.server_cert} was kept; it names {', '.join(kept_names)}"
            f" (`jobworker certs renew-server --dir {_q(paths.directory)} --host NAME"
            " --ip ADDR` re-issues it)"
        )
    # Clients dial the certificate's names: listen where they lead (loopback by default).
    if options.ip:
        listen, where = with_default_port(options.ip[0]), ""
    elif options.host:
        listen, where = f"0.0.0.0:{DEFAULT_PORT}", " (every interface; --ip names one)"
    else:
        listen, where = DEFAULT_ADDRESS, ""
    server = paths.server()
    print(f"\nstart the server{where}:")
    print(
        f"  jobworker serve --listen {listen} --tls-cert {_q(server.cert)}"
        f" --tls-key {_q(server.key)} --tls-ca {_q(server.ca)} --tls-crl {_q(paths.crl)}"
        f" --authz {_q(paths.authz)}"
    )
    for name, role in clients:
        print(f"\nconnect as {name} ({role}):")
        print(_export(_server_address(paths), paths.client(name)))
    print(f"\nmore clients: jobworker certs add-client --dir {_q(paths.directory)} NAME:ROLE")
    return 0


def _add_client(options: argparse.Namespace) -> int:
    name, role = options.client
    added = certs.add_client(options.dir, name, role)
    paths = PkiPaths(options.dir)
    print(f"issued {name}'s certificate: {added.files.cert} and {added.files.key}")
    if added.whitelisted:
        print(f"added {name} as {role} to {paths.authz}")
    else:
        print(f"{paths.authz} lists {name} as {role} already")
    print(
        f"\nnext: hand {name} three files over a safe channel (the key is secret):"
        f" {added.files.cert}, {added.files.key} and {added.files.ca}; {name} connects with"
    )
    print(_export(_server_address(paths), added.files))
    if added.whitelisted:
        print(f"then {_RELOAD}: until then the server does not know {name}")
    return 0


def _revoke(options: argparse.Namespace) -> int:
    revoked = certs.revoke_client(options.dir, options.name)
    paths = PkiPaths(options.dir)
    print(
        f"revoked {options.name}'s certificate (serial {revoked.serial:x}): {revoked.crl.path}"
        f" lists {revoked.crl.revoked} certificate(s), valid until"
        f" {_date(revoked.crl.next_update)}"
    )
    for path in revoked.moved:
        print(f"  moved to {path}")
    print(
        f"\nnext: {_RELOAD}; until then {options.name} can still connect. A server started"
        f" without --tls-crl {_q(revoked.crl.path)} checks no revocation: restart it with it."
    )
    print(
        f"{paths.authz} still lists {options.name}: `jobworker certs add-client"
        f" {options.name}:ROLE` issues a new certificate for it; remove its entry to shut"
        f" {options.name} out for good"
    )
    return 0


def _renew_server(options: argparse.Namespace) -> int:
    renewed = certs.renew_server(options.dir, [*options.host, *options.ip])
    print(
        f"renewed {renewed.files.cert} and {renewed.files.key}: names"
        f" {', '.join(renewed.names)}, valid until {_date(renewed.not_after)}"
    )
    print(f"\nnext: {_RELOAD}; clients need nothing new (same CA)")
    return 0


def _crl(options: argparse.Namespace) -> int:
    state = certs.refresh_crl(options.dir)
    print(
        f"signed {state.path}: {state.revoked} revoked certificate(s), valid until"
        f" {_date(state.next_update)}"
    )
    print(
        f"\nnext: {_RELOAD}. Run `jobworker certs crl --dir {_q(options.dir)}` again before"
        f" {_date(state.next_update)}: past it the server refuses every client"
    )
    return 0


def _state(holder: certs.Holder, now: datetime) -> str:
    if holder.revoked:
        return "revoked"
    if holder.not_after <= now:
        return "expired"
    if holder.name != "server" and holder.role is None:
        return "not whitelisted"
    return "valid"


def _list(options: argparse.Namespace) -> int:
    listing = certs.list_pki(options.dir)
    now = datetime.now(UTC)
    holders = [*([listing.server] if listing.server else []), *listing.clients]
    if options.json:
        print_json(
            {
                "certificates": [
                    {
                        "name": h.name,
                        "path": str(h.path),
                        "names": list(h.names),
                        "role": h.role,
                        "not_after": h.not_after.isoformat(),
                        "state": _state(h, now),
                    }
                    for h in holders
                ],
                "crl_revoked": listing.crl_revoked,
                "crl_next_update": listing.crl_next_update and listing.crl_next_update.isoformat(),
            }
        )
        return 0
    width = max([4, *(len(h.name) for h in holders)])
    print(f"{'NAME':{width}}  {'ROLE':6}  {'UNTIL (UTC)':16}  STATE")
    for h in holders:
        role = "server" if h.name == "server" else h.role or "-"
        until = h.not_after.strftime("%Y-%m-%d %H:%M")
        print(for_terminal(f"{h.name:{width}}  {role:6}  {until:16}  {_state(h, now)}"))
    if listing.server is not None:
        print(f"\nthe server certificate names {', '.join(listing.server.names)}")
    if listing.crl_next_update is None:
        print(f"no CRL: `jobworker certs crl --dir {_q(options.dir)}` writes one")
        return 0
    print(
        f"{_q(PkiPaths(options.dir).crl)}: {listing.crl_revoked} revoked, valid until"
        f" {_date(listing.crl_next_update)}"
    )
    if listing.crl_next_update - now < timedelta(days=7):
        print(
            f"next: re-sign it before then, `jobworker certs crl --dir {_q(options.dir)}`,"
            " and reload the server"
        )
    return 0

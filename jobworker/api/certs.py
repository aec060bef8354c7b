"""The life of a PKI after ``init_pki``: clients come and go, the server certificate is
renewed (``jobworker certs add-client``, ``revoke``, ``renew-server``; docs/certificates.md).

Each step leaves the directory whole for a server that re-reads it on SIGHUP: the
certificate is written before the whitelist names it, the CRL lists a serial before its
files move to ``revoked/``, and every file a server reads is replaced by a rename.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import attrs
from cryptography import x509

from jobworker.api.pki import (
    CertAuthority,
    CrlState,
    PkiPaths,
    authz_entry,
    authz_toml,
    check_client,
    check_client_name,
    check_issued,
    default_server_names,
    issue_client_cert,
    issue_server_cert,
    publish_crl,
    replace_file,
    write_new,
)
from jobworker.api.tlsfiles import TlsFiles
from jobworker.errors import ConfigError, InvalidArgument

# RFC 1123 labels; a leading "*." for a wildcard certificate.
_HOST_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def host_name(text: str) -> str:
    """A DNS name for a server certificate (``--host``); an address belongs in ``--ip``."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        raise ValueError(f"{text!r} is an IP address: give it with --ip")
    if not _HOST_NAME.fullmatch(text) or len(text) > 253:
        raise ValueError(f"{text!r} is not a host name (letters, digits, '-' and '.')")
    return text.lower()


def ip_address(text: str) -> str:
    """An IP address for a server certificate (``--ip``), in its canonical spelling."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address") from None


def certificate_names(path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate's SAN lists, in its order."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in sans if isinstance(name, x509.DNSName | x509.IPAddress)]


def open_pki(directory: Path) -> tuple[PkiPaths, CertAuthority]:
    """The paths of an existing PKI and its CA; a ``ConfigError`` that says how to make one."""
    paths = PkiPaths(directory)
    if not (paths.ca_cert.exists() and paths.ca_key.exists()):
        raise ConfigError(
            f"no CA in {directory} (ca.pem and ca-key.pem): create one with"
            f" `jobworker certs init --dir {directory}`"
        )
    return paths, paths.load_ca()


def _listed_role(authz: Path, name: str) -> str | None:
    """The role ``authz`` gives the identity ``name``, None if it does not list it."""
    if not authz.exists():
        return None
    try:
        clients = tomllib.loads(authz.read_text()).get("clients", [])
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{authz}: {err}") from None
    for entry in clients if isinstance(clients, list) else []:
        if isinstance(entry, dict) and entry.get("identity") == name:
            return str(entry.get("role"))
    return None


def _whitelist(authz: Path, name: str, role: str) -> None:
    if not authz.exists():
        write_new(authz, authz_toml([(name, role)]), 0o644)
        return
    text = authz.read_text()
    separator = "" if not text or text.endswith("\n") else "\n"
    replace_file(authz, (text + separator + authz_entry(name, role)).encode(), authz.stat().st_mode)


@attrs.frozen
class ClientAdded:
    """A client certificate issued by ``add_client``; ``whitelisted``: its entry was added
    (False: ``authz.toml`` listed it already, with the same role)."""

    files: TlsFiles
    whitelisted: bool


def add_client(directory: Path, name: str, role: str) -> ClientAdded:
    """Issue ``name``'s client certificate and list it in ``authz.toml`` with ``role``."""
    check_client(name, role)
    paths, ca = open_pki(directory)
    listed = _listed_role(paths.authz, name)
    if listed not in (None, role):
        raise InvalidArgument(
            f"{paths.authz} lists {name!r} as {listed}: change the role there, or pick another name"
        )
    for path in (paths.client_cert(name), paths.client_key(name)):
        if path.exists():
            raise InvalidArgument(
                f"{path} exists: {name!r} has a certificate already (revoke it first to"
                " issue a new one, or pick another name)"
            )
    issue_client_cert(ca, name).write(paths.client_cert(name), paths.client_key(name))
    if listed is None:
        _whitelist(paths.authz, name, role)
    return ClientAdded(files=paths.client(name), whitelisted=listed is None)


@attrs.frozen
class Revoked:
    """What ``revoke_client`` did: the serial it revoked, the CRL, the files it moved."""

    serial: int
    crl: CrlState
    moved: tuple[Path, ...]


def revoke_client(directory: Path, name: str) -> Revoked:
    """Add ``name``'s certificate to the CRL, then move its files to ``revoked/`` (so the
    name can be issued again). Its whitelist entry stays: a new certificate reuses it."""
    check_client_name(name)
    paths, ca = open_pki(directory)
    cert_path = paths.client_cert(name)
    if not cert_path.exists():
        raise InvalidArgument(
            f"no client {name!r} to revoke: {cert_path} does not exist (already revoked ones"
            f" are in {paths.revoked})"
        )
    serial = check_issued(cert_path, ca, paths.ca_cert).serial_number
    crl = publish_crl(paths, ca, revoke=[serial])
    paths.revoked.mkdir(mode=0o700, exist_ok=True)
    moved = []
    for path in (cert_path, paths.client_key(name)):
        if path.exists():
            target = paths.revoked / f"{serial:x}-{path.name}"
            os.rename(path, target)
            moved.append(target)
    return Revoked(serial=serial, crl=crl, moved=tuple(moved))


@attrs.frozen
class ServerRenewed:
    """The server certificate ``renew_server`` wrote: its names and its expiry."""

    files: TlsFiles
    names: tuple[str, ...]
    not_after: datetime


def renew_server(directory: Path, names: Sequence[str] = ()) -> ServerRenewed:
    """Replace the server certificate and key with new ones, for ``names`` (default: the
    names of the certificate replaced, or ``default_server_names()`` if there is none)."""
    paths, ca = open_pki(directory)
    if not names and paths.server_cert.exists():
        names = certificate_names(paths.server_cert)
    issued = issue_server_cert(ca, list(names) or default_server_names())
    replace_file(paths.server_key, issued.key_pem, 0o600)
    replace_file(paths.server_cert, issued.cert_pem, 0o644)
    return ServerRenewed(
        files=paths.server(),
        names=tuple(certificate_names(paths.server_cert)),
        not_after=issued.cert.not_valid_after_utc,
    )


def refresh_crl(directory: Path) -> CrlState:
    """Re-sign the CRL as it is, fresh for ``CRL_VALIDITY`` (a cron job's task)."""
    paths, ca = open_pki(directory)
    return publish_crl(paths, ca)


@attrs.frozen
class Holder:
    """One certificate of the PKI as ``list_pki`` finds it."""

    name: str  # the client name, or "server"
    path: Path
    names: tuple[str, ...]  # its DNS and IP SANs
    not_after: datetime
    role: str | None  # the whitelist's role for a client; None: not listed (or the server)
    revoked: bool


@attrs.frozen
class Listing:
    """The server certificate, the clients (current and revoked), and the CRL."""

    server: Holder | None
    clients: tuple[Holder, ...]
    crl_revoked: int | None  # None: no CRL
    crl_next_update: datetime | None


def list_pki(directory: Path) -> Listing:
    """What the PKI in ``directory`` holds: who has a certificate, until when, with which
    role, and whether the CRL revokes it."""
    paths, ca = open_pki(directory)
    revoked: set[int] = set()
    crl_count: int | None = None
    next_update: datetime | None = None
    if paths.crl.exists():
        crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
        revoked = {entry.serial_number for entry in crl}
        crl_count, next_update = len(revoked), crl.next_update_utc

    def holder(name: str, path: Path) -> Holder:
        cert = check_issued(path, ca, paths.ca_cert)
        return Holder(
            name=name,
            path=path,
            names=tuple(certificate_names(path)),
            not_after=cert.not_valid_after_utc,
            role=None if name == "server" else _listed_role(paths.authz, name),
            revoked=cert.serial_number in revoked,
        )

    special = {paths.ca_cert.name, paths.server_cert.name}
    current = [
        holder(path.stem, path)
        for path in sorted(directory.glob("*.pem"))
        if path.name not in special and not path.stem.endswith("-key")
    ]
    gone = [
        holder(path.stem.split("-", 1)[1], path)
        for path in sorted(paths.revoked.glob("*.pem"))
        if not path.stem.endswith("-key")
    ]
    server = holder("server", paths.server_cert) if paths.server_cert.exists() else None
    return Listing(server, tuple(current + gone), crl_count, next_update)

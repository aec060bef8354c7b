"""A small PKI in one directory: a CA, a server certificate, client certificates, the
whitelist that names the clients, and the CRL that revokes them (docs/certificates.md).

The directory is the whole state: a client's certificate is ``NAME.pem``, a revoked one
moves to ``revoked/``, and the CRL lists every serial ever revoked. Keys are ECDSA P-256,
written with mode 0600 in a 0700 directory. Files are created, never overwritten, except
the three a running server re-reads on SIGHUP (the server certificate and key, the CRL,
``authz.toml``): those are replaced whole by a rename, so a reload never sees half a file.
Bringing your own CA stays possible: the server only needs the files.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.api.tlsfiles import DEV_CLIENT, PkiFiles
from jobworker.errors import ConfigError, InvalidArgument
from jobworker.plugins.authz import ROLES

CA_VALIDITY = timedelta(days=3650)
LEAF_VALIDITY = timedelta(days=825)
#: How long a CRL this module signs stays in force: past it the server refuses every
#: client (fail closed), so ``jobworker certs crl`` must re-sign it before then.
CRL_VALIDITY = timedelta(days=30)
# Tolerate a client or server clock a little behind the one that issued the certificate.
_BACKDATE = timedelta(minutes=5)
# Client names become file names and certificate names: keep them plain.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_RESERVED_NAMES = frozenset({"ca", "server", "authz"})


@attrs.frozen
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write both files; fails with ``FileExistsError`` rather than overwrite."""
        write_new(key_path, self.key_pem, 0o600)
        write_new(cert_path, self.cert_pem, 0o644)


@attrs.frozen
class CertAuthority(Issued):
    """A CA certificate and key that can sign leaf certificates and CRLs."""

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertAuthority:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"CA key {key_path} is not an ECDSA key")
        return cls(cert=cert, key=key)


@attrs.frozen
class PkiPaths(PkiFiles):
    """Where ``init_pki`` put each file, and which of them it created or found."""

    directory: Path
    created: tuple[Path, ...] = ()
    existing: tuple[Path, ...] = ()

    def load_ca(self) -> CertAuthority:
        return CertAuthority.load(self.ca_cert, self.ca_key)


def write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never replace a file; the mode is set at creation, so a key is never
    # readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` whole: a server reloading it at that moment reads the old file or
    the new one, never a mix."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    write_new(temporary, data, mode)
    os.replace(temporary, path)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA only signs certificates and CRLs; a leaf only signs handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(name: str = "jobworker dev CA") -> CertAuthority:
    """A new self-signed CA, valid for ``CA_VALIDITY``."""
    key = _new_key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return CertAuthority(cert=cert, key=key)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _issue(
    ca: CertAuthority,
    common_name: str,
    names: Sequence[str],
    usage: x509.ObjectIdentifier,
    not_before: datetime | None,
    not_after: datetime | None,
) -> Issued:
    key = _new_key()
    start = not_before or datetime.now(UTC) - _BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after or start + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in names]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert=cert, key=key)


def check_client_name(name: str) -> None:
    if not _CLIENT_NAME.fullmatch(name) or name in _RESERVED_NAMES or name.endswith("-key"):
        raise InvalidArgument(
            f"client name {name!r}: use up to 63 letters, digits, '.', '_' or '-', "
            "not 'ca', 'server', 'authz', nor a name ending in '-key'"
        )


def issue_client_cert(
    ca: CertAuthority,
    name: str,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """A client certificate with CN=``name`` and the same DNS SAN, for client auth only.

    ``not_before``/``not_after`` default to now (minus 5 minutes) and ``LEAF_VALIDITY``
    later; tests pass past dates to get an expired certificate.
    """
    check_client_name(name)
    return _issue(ca, name, [name], ExtendedKeyUsageOID.CLIENT_AUTH, not_before, not_after)


def default_server_names() -> list[str]:
    """localhost, the loopback addresses, and this machine's host name."""
    names = ["localhost", "127.0.0.1", "::1"]
    if (host := socket.gethostname()) and host not in names:
        names.append(host)
    return names


def issue_server_cert(ca: CertAuthority, names: Sequence[str]) -> Issued:
    """A server certificate for ``names`` (host names or IP addresses), CN = the first."""
    if not names:
        raise InvalidArgument("a server certificate needs at least one name")
    return _issue(ca, names[0], names, ExtendedKeyUsageOID.SERVER_AUTH, None, None)


def _sign_crl(
    ca: CertAuthority,
    revoked: Iterable[x509.RevokedCertificate],
    path: Path,
    last_update: datetime,
    next_update: datetime,
) -> Path:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(last_update)
        .next_update(next_update)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    replace_file(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return path


def write_crl(
    ca: CertAuthority,
    revoked_serials: Iterable[int],
    path: Path,
    *,
    last_update: datetime | None = None,
    next_update: datetime | None = None,
) -> Path:
    """Write a PEM CRL signed by ``ca`` (replacing ``path``, as a CA re-publishes it).

    ``next_update`` defaults to 7 days after ``last_update`` (default: now).
    """
    issued = last_update or datetime.now(UTC) - _BACKDATE
    entries = [
        x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(issued).build()
        for serial in revoked_serials
    ]
    return _sign_crl(ca, entries, path, issued, next_update or issued + timedelta(days=7))


@attrs.frozen
class CrlState:
    """A CRL as just signed: how many serials it revokes, and when it must be re-signed."""

    path: Path
    revoked: int
    next_update: datetime


def publish_crl(
    paths: PkiPaths,
    ca: CertAuthority,
    revoke: Iterable[int] = (),
    validity: timedelta = CRL_VALIDITY,
) -> CrlState:
    """Re-sign ``paths.crl``: every serial it revoked, plus ``revoke``, fresh for ``validity``."""
    entries: list[x509.RevokedCertificate] = []
    if paths.crl.exists():
        try:
            old = x509.load_pem_x509_crl(paths.crl.read_bytes())
        except ValueError:
            raise ConfigError(f"{paths.crl} is not a PEM CRL: move it away to start anew") from None
        if not old.is_signature_valid(ca.key.public_key()):
            raise ConfigError(f"{paths.crl} is not signed by {paths.ca_cert}: move it away")
        entries = list(old)
    now = datetime.now(UTC)
    known = {entry.serial_number for entry in entries}
    entries += [
        x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        for serial in revoke
        if serial not in known
    ]
    next_update = now + validity
    _sign_crl(ca, entries, paths.crl, now - _BACKDATE, next_update)
    return CrlState(path=paths.crl, revoked=len(entries), next_update=next_update)


def authz_entry(name: str, role: str) -> str:
    return f'\n[[clients]]\nidentity = "{name}"\nrole = "{role}"\n'


def authz_toml(clients: Sequence[tuple[str, str]]) -> bytes:
    header = (
        "# Who may call this jobworker server; every other client is refused.\n"
        "# identity: matched against the certificate CN, then its DNS, e-mail and URI SANs.\n"
        '# role: "user" sees only its own jobs; "admin" sees every job.\n'
    )
    return "".join([header, *(authz_entry(name, role) for name, role in clients)]).encode()


def check_client(name: str, role: str) -> None:
    check_client_name(name)
    if role not in ROLES:
        raise InvalidArgument(f"client {name!r}: role {role!r} is not one of {ROLES}")


def check_issued(cert_path: Path, ca: CertAuthority, ca_path: Path) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            f"{cert_path} was not issued by {ca_path}: remove it to re-issue"
        ) from None
    return cert


def init_pki(
    directory: Path,
    clients: Sequence[tuple[str, str]] = ((DEV_CLIENT, "admin"),),
    server_names: Sequence[str] | None = None,
) -> PkiPaths:
    """Create a PKI in ``directory``, keeping whatever is already there.

    ``clients`` are (name, role) pairs; ``server_names`` default to
    ``default_server_names()``. An existing CA is reused to issue missing certificates;
    an existing certificate that this CA did not issue is a ``ConfigError`` (remove it to
    re-issue). An existing ``authz.toml`` or CRL is never touched (``add_client`` and
    ``revoke_client`` change them).
    """
    for name, role in clients:
        check_client(name, role)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    paths = PkiPaths(directory)
    created: list[Path] = []
    existing: list[Path] = []

    ca_files = [paths.ca_cert, paths.ca_key]
    if all(path.exists() for path in ca_files):
        ca = paths.load_ca()
        existing += ca_files
    elif any(path.exists() for path in ca_files):
        raise ConfigError(
            f"{directory} has only one of ca.pem and ca-key.pem: remove it or restore the other"
        )
    else:
        ca = make_ca()
        ca.write(paths.ca_cert, paths.ca_key)
        created += ca_files

    def ensure(cert_path: Path, key_path: Path, issue: Callable[[], Issued]) -> None:
        pair = [cert_path, key_path]
        if not any(path.exists() for path in pair):
            issue().write(cert_path, key_path)
            created.extend(pair)
            return
        if not all(path.exists() for path in pair):
            raise ConfigError(f"only one of {cert_path} and {key_path} exists: remove it")
        check_issued(cert_path, ca, paths.ca_cert)
        existing.extend(pair)

    names = list(server_names) if server_names is not None else default_server_names()
    ensure(paths.server_cert, paths.server_key, lambda: issue_server_cert(ca, names))
    for name, _role in clients:
        ensure(
            paths.client_cert(name), paths.client_key(name), partial(issue_client_cert, ca, name)
        )

    if paths.authz.exists():
        existing.append(paths.authz)
    else:
        write_new(paths.authz, authz_toml(clients), 0o644)
        created.append(paths.authz)
    if paths.crl.exists():
        existing.append(paths.crl)
    else:
        publish_crl(paths, ca)
        created.append(paths.crl)
    return attrs.evolve(paths, created=tuple(created), existing=tuple(existing))

"""The TLS files of one endpoint: which they are, where the dev PKI keeps them, and whether
they are usable, checked with the standard library alone.

Both ends load their files through :func:`load_material`, so a client and a server refuse
the same mistakes with the same words. It needs neither grpc nor ``cryptography`` (about as
long to import as grpc): a client command imports only what a connection needs. The
server's side of TLS (TLS 1.3 only, reloading, revocation) is :mod:`jobworker.api.tls`;
making certificates is :mod:`jobworker.api.pki`.
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple, Self

from jobworker.errors import ConfigError, UsageError

#: The client of the dev PKI that client commands use when given no certificate.
DEV_CLIENT = "admin"

_PEM_CERTIFICATE_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_CERTIFICATE_END = "-----END CERTIFICATE-----"
# DER tags (X.690) met on the way to a certificate's validity (RFC 5280, 4.1).
_DER_EXPLICIT_VERSION = 0xA0
_DER_UTC_TIME = 0x17


def default_pki_dir() -> Path:
    """``$JOBWORKER_HOME``, else ``$XDG_DATA_HOME/jobworker/pki``, else
    ``~/.local/share/jobworker/pki``."""
    if home := os.environ.get("JOBWORKER_HOME"):
        return Path(home)
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "jobworker" / "pki"


class _TlsPaths(NamedTuple):
    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None


class TlsFiles(_TlsPaths):
    """The PEM files of one TLS endpoint: its certificate (chain), its key, the CA
    bundle that verifies the other side, and optionally a CRL of that CA. Given as
    strings or paths, held as paths; ``_replace`` makes a changed copy."""

    __slots__ = ()

    def __new__(
        cls,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str],
        crl: str | os.PathLike[str] | None = None,
    ) -> Self:
        optional = None if crl is None else Path(crl)
        return super().__new__(cls, Path(cert), Path(key), Path(ca), optional)


def given_files(
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    ca: str | os.PathLike[str] | None,
    *,
    crl: str | os.PathLike[str] | None = None,
    labels: Sequence[str] = ("--tls-cert", "--tls-key", "--tls-ca"),
) -> TlsFiles | None:
    """The files given as options, or None when none is (the caller falls back to the dev
    PKI). Raises ``UsageError`` naming the missing ones (by ``labels``) when only some are.
    """
    values = (cert, key, ca)
    if not any(values):
        return None
    missing = [label for label, value in zip(labels, values, strict=True) if not value]
    if missing:
        raise UsageError(
            f"--tls-cert, --tls-key and --tls-ca go together: missing {', '.join(missing)}"
        )
    assert cert and key and ca
    return TlsFiles(cert=cert, key=key, ca=ca, crl=crl)


class PkiFiles:
    """Where a PKI directory (``jobworker certs init``) keeps each file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.directory!r})"

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"

    @property
    def authz(self) -> Path:
        return self.directory / "authz.toml"

    @property
    def crl(self) -> Path:
        return self.directory / "ca.crl"

    @property
    def revoked(self) -> Path:
        """Where ``revoke_client`` moves a revoked client's files, freeing its name."""
        return self.directory / "revoked"

    def client_cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def client_key(self, name: str) -> Path:
        return self.directory / f"{name}-key.pem"

    def server(self) -> TlsFiles:
        return TlsFiles(cert=self.server_cert, key=self.server_key, ca=self.ca_cert)

    def client(self, name: str) -> TlsFiles:
        return TlsFiles(cert=self.client_cert(name), key=self.client_key(name), ca=self.ca_cert)


class Material(NamedTuple):
    """The checked PEM bytes grpc takes."""

    cert_chain: bytes
    key: bytes
    ca: bytes


def load_material(files: TlsFiles) -> Material:
    """Read ``files`` and check them: certificates in PEM, the leaf not expired, the key
    private to us, unencrypted and matching the leaf. Raises ``ConfigError`` naming the
    file (never quoting a key)."""
    cert_chain = read_certificates(files.cert, "certificate")
    expires = _not_after(ssl.PEM_cert_to_DER_cert(_first_pem(cert_chain)))
    if expires <= datetime.now(UTC):
        raise ConfigError(f"certificate {files.cert} expired on {expires:%Y-%m-%d %H:%M}Z")
    key = _read_private_key(files.key)
    _check_pair(files.cert, files.key)
    ca = read_certificates(files.ca, "CA bundle")
    return Material(cert_chain=cert_chain, key=key, ca=ca)


def read_file(path: Path, what: str) -> bytes:
    """The bytes of a PEM or DER file; ConfigError naming ``what`` when it cannot be used."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{what} {path} is not readable by uid {os.getuid()}") from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    if not data.strip():
        raise ConfigError(f"{what} {path} is empty")
    return data


def read_certificates(path: Path, what: str) -> bytes:
    """The bytes of a PEM file of certificates; ConfigError when it holds none."""
    data = read_file(path, what)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode())
    except (ssl.SSLError, UnicodeDecodeError):
        raise ConfigError(f"{what} {path} holds no PEM certificate") from None
    return data


def _read_private_key(path: Path) -> bytes:
    data = read_file(path, "private key")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"private key {path} is accessible by other users (mode {stat.filemode(mode)}): "
            f"run chmod 600 {path}"
        )
    return data


class _Encrypted(Exception):
    """OpenSSL asked for the key's passphrase."""


def _ask_passphrase() -> bytes:
    raise _Encrypted


def _check_pair(cert: Path, key: Path) -> None:
    """The key is a PEM private key, unencrypted, and belongs to the leaf of ``cert``."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, _ask_passphrase)
    except _Encrypted:
        raise ConfigError(f"private key {key} is encrypted; grpc needs it unencrypted") from None
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"private key {key} does not belong to certificate {cert}") from None
        raise ConfigError(f"private key {key} is not a PEM private key") from None


def _first_pem(chain: bytes) -> str:
    """The first PEM certificate of ``chain`` (the leaf), already known to hold one; text
    around it (``openssl`` writes "Bag Attributes" before it) is left out."""
    text = chain.decode()
    start = text.index(_PEM_CERTIFICATE_BEGIN)
    return text[start : text.index(_PEM_CERTIFICATE_END, start) + len(_PEM_CERTIFICATE_END)]


def _der_element(der: bytes, at: int) -> tuple[int, int, int]:
    """The tag of the DER element at ``at``, and where its content starts and ends."""
    tag, length, start = der[at], der[at + 1], at + 2
    if length & 0x80:  # long form: the next (length & 0x7F) bytes hold the length
        size = length & 0x7F
        length, start = int.from_bytes(der[start : start + size], "big"), start + size
    return tag, start, start + length


def _not_after(der: bytes) -> datetime:
    """When a certificate (DER, already parsed by OpenSSL) expires: in ``Certificate``,
    ``tbsCertificate``; past its version, serial number, signature algorithm and issuer,
    ``validity``; its second time (RFC 5280, 4.1)."""
    _tag, tbs, _end = _der_element(der, 0)
    _tag, field, _end = _der_element(der, tbs)
    tag, _start, end = _der_element(der, field)
    if tag == _DER_EXPLICIT_VERSION:
        end = _der_element(der, end)[2]  # the serial number
    for _skipped in ("signature", "issuer"):
        end = _der_element(der, end)[2]
    _tag, validity, _end = _der_element(der, end)
    tag, start, end = _der_element(der, _der_element(der, validity)[2])
    text = der[start:end].decode()
    if tag == _DER_UTC_TIME:  # YYMMDDHHMMSSZ; YY below 50 is 20YY (RFC 5280, 4.1.2.5.1)
        year = int(text[:2])
        text = f"{year + (1900 if year >= 50 else 2000)}{text[2:]}"
    # YYYYMMDDHHMMSSZ, read by hand: strptime imports a module on first use, which a
    # process that dropped its privileges may no longer be allowed to read.
    month, day, hour, minute, second = (int(text[i : i + 2]) for i in range(4, 14, 2))
    return datetime(int(text[:4]), month, day, hour, minute, second, tzinfo=UTC)

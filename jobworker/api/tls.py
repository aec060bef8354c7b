"""Mutual TLS for jobworker: credentials, TLS 1.3 only, revocation, and the per-RPC check.

grpcio's Python API can neither set a minimum TLS version nor load a CRL
(grpc/grpc#37305). So:

* TLS 1.2 is refused at the handshake by restricting grpc's TLS 1.2 cipher suites to one
  that no client can negotiate with this server (:mod:`jobworker.api.grpcenv` sets it before
  grpc is imported, which is the only time grpc reads it). ``server_credentials`` proves
  it is in force with a real TLS 1.2 handshake and refuses to start otherwise.
* Revocation is checked per RPC by ``check_peer``, which also re-checks the TLS version.
* Certificates can be replaced while the server runs (:class:`ServerCertificates`): grpc's
  ``dynamic_ssl_server_credentials`` asks a callback before each new connection's
  handshake whether the certificate configuration changed.

Which files, and the checks both ends run on them, are :mod:`jobworker.api.tlsfiles`
(light enough for the client, which never imports this module). See docs/security.md.
"""

from __future__ import annotations

# First: grpc reads how to refuse TLS 1.2 once, when it is imported.
from jobworker.api.grpcenv import (  # isort: split
    CIPHER_SUITES_VAR,
    TLS12_REFUSING_CIPHER_SUITES,
    grpc,
)

import contextlib
import functools
import socket
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from jobworker.api.identity import Identity, identity_from_auth_context
from jobworker.api.tlsfiles import Material, TlsFiles, load_material, read_certificates, read_file
from jobworker.errors import ConfigError, Unauthenticated

log = structlog.get_logger(__name__)

_TLS13 = b"TLSv1.3"
_CA_KEY_TYPES = (
    ec.EllipticCurvePublicKey,
    rsa.RSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)
_TLS_HANDSHAKE_RECORD = 0x16
_PROBE_TIMEOUT_S = 5.0
#: How long before a CRL's next update time the server starts logging that it expires.
CRL_WARNING_AHEAD = timedelta(days=1)


def _tls12_client_hello() -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing)
    # The handshake stops there, waiting for the server; the ClientHello is written.
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _answers_tls12(port: int) -> bool:
    """Send a TLS 1.2 ClientHello and say whether the server answered with a ServerHello.

    A refusing server sends an alert or just closes the connection.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=_PROBE_TIMEOUT_S) as sock:
        sock.sendall(_tls12_client_hello())
        try:
            first = sock.recv(1)
        except ConnectionResetError:
            return False
    return first == bytes([_TLS_HANDSHAKE_RECORD])


def _ensure_tls12_refused(credentials: grpc.ServerCredentials) -> None:
    """Prove, with a throw-away server and a real handshake, that TLS 1.2 is refused."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        probe = grpc.server(pool)
        port = probe.add_secure_port("127.0.0.1:0", credentials)
        if not port:
            raise ConfigError("cannot listen on 127.0.0.1 to check that TLS 1.2 is refused")
        probe.start()
        try:
            accepted = _answers_tls12(port)
        except OSError as err:
            raise ConfigError(f"cannot check that TLS 1.2 is refused: {err}") from None
        finally:
            probe.stop(None).wait()
    if accepted:
        raise ConfigError(
            "grpc accepts TLS 1.2 in this process because it was imported before "
            f"jobworker.api.grpcenv could set {CIPHER_SUITES_VAR}: import jobworker.api.tls "
            "before grpc, "
            f"or start the process with {CIPHER_SUITES_VAR}={TLS12_REFUSING_CIPHER_SUITES}"
        )


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for a TLS 1.3-only server that requires a client certificate from ``ca``.

    Raises ``ConfigError`` naming the file when a file is missing, unreadable, malformed,
    a key is readable by others or does not match its certificate, the certificate has
    expired, or TLS 1.2 could not be disabled in this process.
    """
    material = load_material(files)
    credentials = grpc.ssl_server_credentials(
        [(material.key, material.cert_chain)],
        root_certificates=material.ca,
        require_client_auth=True,
    )
    _ensure_tls12_refused(credentials)
    return credentials


def _certificate_configuration(material: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert_chain)], root_certificates=material.ca
    )


class ServerCertificates:
    """The server's certificate, key and client CA bundle, replaceable while it runs.

    ``credentials`` are grpc's dynamic SSL credentials: before the handshake of every new
    connection grpc calls :meth:`_fetch` (on one of its own threads), which hands over a
    configuration put in force by :meth:`prepare`'s callable, once. Connections already
    open keep the certificates of their handshake. Built with the checks of
    :func:`server_credentials` (TLS 1.2 refused, files checked); raises ``ConfigError``.
    """

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        # The TLS 1.2 probe gets credentials of its own: grpc hands the initial
        # configuration of dynamic credentials to the first server that uses them only.
        server_credentials(files)
        initial = _certificate_configuration(load_material(files))
        self.credentials = grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=True
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def prepare(self) -> Callable[[], None]:
        """Read and check the files again; the callable puts them in force for new
        connections. Raises ``ConfigError`` naming the file, and nothing changes."""
        material = load_material(self._files)
        configuration = _certificate_configuration(material)

        def commit() -> None:
            with self._lock:
                self._pending = configuration
            log.info("tls_certificates_reloaded", cert=str(self._files.cert))

        return commit


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    if ca.subject != crl.issuer or not isinstance(key, _CA_KEY_TYPES):
        return False
    return crl.is_signature_valid(key)


@attrs.frozen
class _LoadedCrl:
    crl: x509.CertificateRevocationList
    next_update: datetime


@attrs.define
class RevocationList:
    """A CRL, verified against the CA bundle, checked for each RPC by ``check_peer``.

    Loading (at construction and by ``reload``) raises ``ConfigError`` when the file is
    unreadable, not a CRL, not signed by a CA of the bundle, or has no next update time;
    on a failed ``reload`` the previous list stays in force. Once past its next update
    time the list is stale and every certificate counts as revoked (fail closed) until a
    fresh CRL is loaded.
    """

    path: Path = attrs.field(converter=Path)
    ca: Path = attrs.field(converter=Path)
    _loaded: _LoadedCrl = attrs.field(init=False)
    _stale_logged: bool = attrs.field(init=False, default=False)
    _soon_logged: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self.reload()

    def reload(self) -> None:
        """Read and verify the CRL file again (after the CA published a new one)."""
        self.prepare()()

    def prepare(self) -> Callable[[], None]:
        """Read and verify the CRL file; the callable puts it in force. Raises
        ``ConfigError`` naming the file, and the list in force stays."""
        loaded = self._read()

        def commit() -> None:
            self._loaded = loaded
            self._stale_logged = self._soon_logged = False
            log.info(
                "crl_loaded",
                path=str(self.path),
                revoked=len(loaded.crl),
                next_update=loaded.next_update.isoformat(),
            )
            self.check_expiry()

        return commit

    def _read(self) -> _LoadedCrl:
        data = read_file(self.path, "CRL")
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                crl = x509.load_pem_x509_crl(data)
            else:
                crl = x509.load_der_x509_crl(data)
        except ValueError:
            raise ConfigError(f"CRL {self.path} is neither a PEM nor a DER CRL") from None
        cas = x509.load_pem_x509_certificates(read_certificates(self.ca, "CA bundle"))
        if not any(_signed_by(crl, ca) for ca in cas):
            raise ConfigError(
                f"CRL {self.path} (issuer {crl.issuer.rfc4514_string()}) is not signed by "
                f"a CA in {self.ca}"
            )
        next_update = crl.next_update_utc
        if next_update is None:
            raise ConfigError(f"CRL {self.path} has no next update time")
        return _LoadedCrl(crl=crl, next_update=next_update)

    @property
    def next_update(self) -> datetime:
        """When the CA promised a fresh CRL; after it, everyone counts as revoked."""
        return self._loaded.next_update

    @property
    def warning_times(self) -> tuple[datetime, datetime]:
        """When :meth:`check_expiry` has something to say: a day before the next update
        time, and at it."""
        return self.next_update - CRL_WARNING_AHEAD, self.next_update

    def check_expiry(self) -> None:
        """Log an error, once per loaded CRL, when it expires within a day, and when it
        has expired (then everyone is refused)."""
        if self._log_if_stale() or self._soon_logged:
            return
        if datetime.now(UTC) >= self.next_update - CRL_WARNING_AHEAD:
            self._soon_logged = True
            log.error(
                "crl_expires_soon",
                path=str(self.path),
                next_update=self.next_update.isoformat(),
                consequence="once it expires every client is refused until a fresh CRL is "
                "loaded (replace the file, then send SIGHUP)",
            )

    def _log_if_stale(self) -> bool:
        stale = datetime.now(UTC) >= self._loaded.next_update
        if stale and not self._stale_logged:
            self._stale_logged = True
            log.error(
                "crl_expired",
                path=str(self.path),
                next_update=self._loaded.next_update.isoformat(),
                consequence="every client is refused until a fresh CRL is loaded",
            )
        return stale

    def revocation_reason(self, leaf_pem: bytes) -> str | None:
        """Why the certificate must be refused, or None if the CRL lets it through."""
        if self._log_if_stale():
            return (
                f"the server's CRL expired on {self._loaded.next_update:%Y-%m-%d %H:%M}Z "
                "and everyone is refused until it is renewed: ask the server operator"
            )
        try:
            cert = x509.load_pem_x509_certificate(leaf_pem)
        except ValueError:
            return "the client certificate could not be parsed"
        crl = self._loaded.crl
        if cert.issuer != crl.issuer:
            return (
                f"no CRL covers the certificate's issuer {cert.issuer.rfc4514_string()}: "
                "ask the server operator"
            )
        revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if revoked is not None:
            return (
                f"the client certificate (serial {cert.serial_number:#x}) was revoked on "
                f"{revoked.revocation_date_utc:%Y-%m-%d %H:%M}Z: ask for a new certificate"
            )
        return None

    def is_revoked(self, leaf_pem: bytes) -> bool:
        """Whether the PEM leaf certificate is revoked (or cannot be cleared: see class)."""
        return self.revocation_reason(leaf_pem) is not None


@attrs.frozen
class ValidityDates:
    """When a client certificate is good: from ``not_before`` until ``not_after``."""

    not_before: datetime
    not_after: datetime
    serial: int


@functools.lru_cache(maxsize=1024)
def validity_dates(leaf_pem: bytes) -> ValidityDates:
    """The dates of a PEM certificate grpc verified (cached: every RPC of a connection
    brings the same one); ``Unauthenticated`` if it cannot be parsed."""
    try:
        cert = x509.load_pem_x509_certificate(leaf_pem)
    except ValueError:
        raise Unauthenticated("the client certificate could not be parsed") from None
    return ValidityDates(cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number)


def refusal(leaf_pem: bytes, crl: RevocationList | None) -> str | None:
    """Why a client certificate verified at its connection's handshake must be refused
    now, or None: outside its validity dates (a connection outlives its handshake), or
    revoked by the CRL in force."""
    dates = validity_dates(leaf_pem)
    now = datetime.now(UTC)
    if now >= dates.not_after:
        return (
            f"the client certificate (serial {dates.serial:#x}) expired on"
            f" {dates.not_after:%Y-%m-%d %H:%M:%S}Z: ask for a new certificate"
        )
    if now < dates.not_before:
        return (
            f"the client certificate (serial {dates.serial:#x}) is not valid before"
            f" {dates.not_before:%Y-%m-%d %H:%M:%S}Z: check the clocks, or wait"
        )
    return None if crl is None else crl.revocation_reason(leaf_pem)


def check_peer(auth_context: Mapping[str, Sequence[bytes]], crl: RevocationList | None) -> Identity:
    """Authenticate one RPC from ``context.auth_context()``: TLS 1.3, a certificate within
    its validity dates, not revoked.

    Call it before every handler runs. Raises ``Unauthenticated`` saying what to fix.
    """
    identity = identity_from_auth_context(auth_context)
    versions = tuple(auth_context.get("ssl_tls_version", ()))
    if versions != (_TLS13,):
        shown = b",".join(versions).decode("ascii", "replace") or "unknown"
        raise Unauthenticated(
            f"TLS version {shown} refused: jobworker requires TLS 1.3, upgrade the client"
        )
    reason = refusal(peer_certificate(auth_context), crl)
    if reason is not None:
        raise Unauthenticated(f"{identity.name}: {reason}")
    return identity


def peer_certificate(auth_context: Mapping[str, Sequence[bytes]]) -> bytes:
    """The client's leaf certificate (PEM) of an authenticated connection."""
    return auth_context["x509_pem_cert"][0]


def authenticate(context: grpc.aio.ServicerContext, crl: RevocationList | None) -> Identity:
    """:func:`check_peer` for one RPC; a refusal is logged with the peer, then raised."""
    try:
        return check_peer(context.auth_context(), crl)
    except Unauthenticated as err:
        log.warning("rpc_unauthenticated", peer=context.peer(), reason=str(err))
        raise

"""Client certificates a careful CA would never issue, signed by the test PKI's CA.

``mint_client`` writes one (and its key) into the PKI directory and returns its files,
so a test can connect with it to a real server and see what the server makes of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.api.pki import CertAuthority, PkiPaths
from jobworker.api.tlsfiles import TlsFiles

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


def mint(
    authority: CertAuthority,
    *,
    common_names: Sequence[str] = (),
    sans: Sequence[x509.GeneralName] = (),
    ca: bool = False,
    usages: Sequence[x509.ObjectIdentifier] | None = (CLIENT_AUTH,),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate with exactly these subject CNs, SANs, CA flag and extended key usages
    (None: no EKU extension), signed by ``authority``, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in common_names]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(authority.key, hashes.SHA256()), key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def mint_client(paths: PkiPaths, file_name: str, **names: Any) -> TlsFiles:
    """:func:`mint` with ``paths``' CA, written as ``file_name``.pem and -key.pem there."""
    cert, key = mint(paths.load_ca(), **names)
    cert_path = paths.directory / f"{file_name}.pem"
    key_path = paths.directory / f"{file_name}-key.pem"
    cert_path.write_bytes(pem(cert))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return TlsFiles(cert=cert_path, key=key_path, ca=paths.ca_cert)

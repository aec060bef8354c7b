"""The checks both ends run on their TLS files, with the standard library alone
(jobworker.api.tlsfiles); what they refuse for a server is in tests/integration/test_tls.py."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from jobworker.api.pki import PkiPaths, init_pki, issue_client_cert
from jobworker.api.tlsfiles import TlsFiles, _not_after, load_material
from jobworker.errors import ConfigError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki"), clients=[("alice", "user")])


def _client(pki: PkiPaths, name: str, not_before: datetime, not_after: datetime) -> TlsFiles:
    issued = issue_client_cert(pki.load_ca(), name, not_before=not_before, not_after=not_after)
    issued.write(pki.client_cert(name), pki.client_key(name))
    return pki.client(name)


def test_good_files_are_read_whole(pki: PkiPaths) -> None:
    files = pki.client("alice")
    material = load_material(files)
    assert (material.cert_chain, material.key, material.ca) == (
        files.cert.read_bytes(),
        files.key.read_bytes(),
        files.ca.read_bytes(),
    )


def test_expired_certificate_is_named_with_its_date(pki: PkiPaths) -> None:
    files = _client(
        pki, "old", datetime(2001, 1, 1, tzinfo=UTC), datetime(2001, 2, 3, 4, 5, tzinfo=UTC)
    )
    with pytest.raises(ConfigError, match=r"certificate .*old\.pem expired on 2001-02-03 04:05Z$"):
        load_material(files)


@pytest.mark.parametrize("year", [2049, 2050, 2051])
def test_expiry_is_read_in_both_encodings(pki: PkiPaths, year: int) -> None:
    """Until 2049 a certificate holds its dates as UTCTime (two-digit years), from 2050 as
    GeneralizedTime (RFC 5280, 4.1.2.5)."""
    expires = datetime(year, 12, 31, 23, 59, 58, tzinfo=UTC)
    files = _client(pki, f"until-{year}", datetime.now(UTC), expires)
    assert load_material(files).cert_chain == files.cert.read_bytes()
    leaf = ssl.PEM_cert_to_DER_cert(files.cert.read_text())
    assert _not_after(leaf) == expires


def test_encrypted_key_is_refused_without_asking_for_a_passphrase(
    pki: PkiPaths, tmp_path: Path
) -> None:
    files = pki.client("alice")
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    encrypted.chmod(0o600)
    with pytest.raises(ConfigError, match=r"encrypted-key\.pem is encrypted; grpc needs it"):
        load_material(TlsFiles(cert=files.cert, key=encrypted, ca=files.ca))


def test_garbage_ca_bundle_is_named(pki: PkiPaths, tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("hello\n")
    files = pki.client("alice")
    with pytest.raises(ConfigError, match=r"CA bundle .*ca\.pem holds no PEM certificate"):
        load_material(TlsFiles(cert=files.cert, key=files.key, ca=garbage))


def test_text_around_the_certificate_is_allowed(pki: PkiPaths, tmp_path: Path) -> None:
    files = pki.client("alice")
    annotated = tmp_path / "annotated.pem"
    annotated.write_bytes(b"Bag Attributes\n    friendlyName: alice\n" + files.cert.read_bytes())
    material = load_material(TlsFiles(cert=annotated, key=files.key, ca=files.ca))
    assert material.cert_chain.endswith(files.cert.read_bytes())

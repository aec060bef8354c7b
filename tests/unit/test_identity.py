"""Identity from grpc's auth context, and the per-RPC peer check, without sockets.

The auth contexts below have the shape grpc 1.85 gives ``context.auth_context()`` for an
mTLS peer (keys and list-of-bytes values as measured), holding real certificates.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from jobworker.api.identity import Identity, identity_from_auth_context
from jobworker.api.pki import CertAuthority, issue_client_cert, make_ca, write_crl
from jobworker.api.tls import RevocationList, check_peer
from jobworker.errors import Unauthenticated
from tests.hostilecerts import SERVER_AUTH, mint, pem


def _auth_context(
    leaf_pem: bytes, cn: bytes | None = b"alice", sans: tuple[bytes, ...] = (b"alice",)
) -> dict[str, list[bytes]]:
    context = {
        "transport_security_type": [b"ssl"],
        "security_level": [b"TSI_PRIVACY_AND_INTEGRITY"],
        "ssl_tls_version": [b"TLSv1.3"],
        "x509_subject": [b"CN=" + (cn or b"")],
        "x509_pem_cert": [leaf_pem],
        "x509_subject_alternative_name": list(sans),
        "peer_dns": list(sans),
    }
    if cn is not None:
        context["x509_common_name"] = [cn]
    return context


@pytest.fixture(scope="module")
def ca() -> CertAuthority:
    return make_ca("test CA")


@pytest.fixture(scope="module")
def alice_pem(ca: CertAuthority) -> bytes:
    return issue_client_cert(ca, "alice").cert_pem


def test_identity_from_mtls_peer(ca: CertAuthority) -> None:
    cert, _ = mint(
        ca,
        common_names=["alice"],
        sans=[
            x509.DNSName("alice"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
            x509.RFC822Name("alice@example.org"),
            x509.UniformResourceIdentifier("spiffe://corp/alice"),
        ],
    )
    identity = identity_from_auth_context(_auth_context(pem(cert)))
    # IP addresses are no names; the others keep the certificate's order.
    assert identity == Identity("alice", ("alice", "alice@example.org", "spiffe://corp/alice"))
    assert identity.name == "alice"
    assert identity.names == ("alice", "alice@example.org", "spiffe://corp/alice")


def test_names_come_from_the_certificate_not_grpcs_rendering(alice_pem: bytes) -> None:
    context = _auth_context(alice_pem, cn=b"root", sans=(b"root",))
    assert identity_from_auth_context(context).names == ("alice",)


def test_name_falls_back_to_first_san(ca: CertAuthority) -> None:
    sans = [x509.UniformResourceIdentifier("spiffe://corp/bob"), x509.DNSName("bob")]
    cert, _ = mint(ca, sans=sans)
    identity = identity_from_auth_context(_auth_context(pem(cert)))
    assert identity.name == "spiffe://corp/bob"
    assert identity.names == ("spiffe://corp/bob", "bob")


@pytest.mark.parametrize(
    "context",
    [
        {"transport_security_type": [b"insecure"], "security_level": [b"TSI_SECURITY_NONE"]},
        {"transport_security_type": [b"ssl"], "ssl_tls_version": [b"TLSv1.3"]},  # no cert
        {},
    ],
    ids=["plaintext", "tls-without-client-cert", "empty"],
)
def test_no_verified_certificate_is_unauthenticated(context: dict[str, list[bytes]]) -> None:
    with pytest.raises(Unauthenticated, match="no verified client certificate"):
        identity_from_auth_context(context)


@pytest.mark.parametrize(
    ("names", "refusal"),
    [
        ({}, "neither a common name nor"),
        ({"sans": [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]}, "neither a common"),
        ({"common_names": ["a", "b"]}, "more than one common name"),
        ({"common_names": ["ops\0evil"]}, r"common name 'ops\\x00evil' holds a control"),
        ({"sans": [x509.DNSName("ops\x7f")]}, "holds a control character"),
        ({"common_names": ["ops"], "ca": True}, "CA:TRUE"),
        ({"common_names": ["ops"], "usages": [SERVER_AUTH]}, "does not include clientAuth"),
    ],
    ids=["no-names", "ip-only", "two-cns", "nul", "del", "ca", "server-eku"],
)
def test_refused_certificates(ca: CertAuthority, names: dict[str, Any], refusal: str) -> None:
    cert, _ = mint(ca, **names)
    with pytest.raises(Unauthenticated, match=refusal):
        identity_from_auth_context(_auth_context(pem(cert)))


def test_a_certificate_without_extended_key_usage_is_a_client(ca: CertAuthority) -> None:
    cert, _ = mint(ca, common_names=["alice"], usages=None)
    assert identity_from_auth_context(_auth_context(pem(cert))).name == "alice"


def test_identity_needs_a_name() -> None:
    with pytest.raises(ValueError, match="needs a common name"):
        Identity("")


# --- check_peer -------------------------------------------------------------------------


@pytest.mark.parametrize("version", [b"TLSv1.2", b"TLSv1.1"])
def test_check_peer_refuses_old_tls(alice_pem: bytes, version: bytes) -> None:
    context = _auth_context(alice_pem) | {"ssl_tls_version": [version]}
    with pytest.raises(Unauthenticated, match=f"TLS version {version.decode()} refused"):
        check_peer(context, None)


def test_check_peer_refuses_unknown_tls_version(alice_pem: bytes) -> None:
    context = _auth_context(alice_pem)
    del context["ssl_tls_version"]
    with pytest.raises(Unauthenticated, match="TLS version unknown refused"):
        check_peer(context, None)


def test_check_peer_without_crl(alice_pem: bytes) -> None:
    assert check_peer(_auth_context(alice_pem), None).name == "alice"


def _crl(ca: CertAuthority, path: Path, serials: list[int], **dates: datetime) -> RevocationList:
    ca_path = path.parent / "ca.pem"
    ca_path.write_bytes(ca.cert_pem)
    return RevocationList(write_crl(ca, serials, path, **dates), ca_path)


def test_check_peer_refuses_revoked_serial(ca: CertAuthority, tmp_path: Path) -> None:
    bob = issue_client_cert(ca, "bob")
    alice = issue_client_cert(ca, "alice")
    crl = _crl(ca, tmp_path / "ca.crl", [bob.cert.serial_number])
    with pytest.raises(Unauthenticated, match=r"bob: the client certificate .* was revoked"):
        check_peer(_auth_context(bob.cert_pem, cn=b"bob", sans=(b"bob",)), crl)
    assert check_peer(_auth_context(alice.cert_pem), crl).name == "alice"


def test_same_serial_from_another_issuer_is_not_this_crls(
    ca: CertAuthority, tmp_path: Path
) -> None:
    # Revocation is by issuer and serial: a foreign certificate is not "cleared" by the
    # CRL either; no CRL covers its issuer, so it is refused (it could not have passed
    # the handshake anyway).
    foreign = issue_client_cert(make_ca("other CA"), "alice")
    crl = _crl(ca, tmp_path / "ca.crl", [])
    assert crl.revocation_reason(foreign.cert_pem) == (
        "no CRL covers the certificate's issuer CN=other CA: ask the server operator"
    )


def test_expired_crl_revokes_everyone(ca: CertAuthority, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    crl = _crl(
        ca,
        tmp_path / "ca.crl",
        [],
        last_update=now - timedelta(days=2),
        next_update=now - timedelta(seconds=1),
    )
    alice = issue_client_cert(ca, "alice")
    assert crl.is_revoked(alice.cert_pem)
    with pytest.raises(Unauthenticated, match=r"CRL expired on .* ask the server operator"):
        check_peer(_auth_context(alice.cert_pem), crl)

"""The PKI after init: add a client, revoke it, renew the server certificate, re-sign the
CRL; each leaves files a server can load (the whitelist through the authz plugin, the
CRL through the server's own RevocationList)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from jobworker.api.certs import (
    add_client,
    certificate_names,
    host_name,
    ip_address,
    refresh_crl,
    renew_server,
    revoke_client,
)
from jobworker.api.pki import CRL_VALIDITY, PkiPaths, init_pki
from jobworker.api.tls import RevocationList
from jobworker.errors import ConfigError, InvalidArgument
from jobworker.plugins.authz import Authz


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return init_pki(
        tmp_path / "pki", clients=[("alice", "user")], server_names=["jobs.example.org", "10.0.0.5"]
    )


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl(pki: PkiPaths) -> x509.CertificateRevocationList:
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    assert crl.is_signature_valid(pki.load_ca().key.public_key())
    RevocationList(pki.crl, pki.ca_cert)  # the server accepts it
    return crl


def test_init_writes_an_empty_crl_the_server_loads(pki: PkiPaths) -> None:
    crl = _crl(pki)
    assert len(crl) == 0
    assert crl.next_update_utc is not None
    left = crl.next_update_utc - datetime.now(UTC)
    assert CRL_VALIDITY - timedelta(minutes=1) < left <= CRL_VALIDITY


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Jobs.Example.org", "jobs.example.org"), ("*.example.org", "*.example.org"), ("h", "h")],
)
def test_host_names(text: str, expected: str) -> None:
    assert host_name(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.5", "is an IP address: give it with --ip"),
        ("-bad.example", "is not a host name"),
        ("a b", "is not a host name"),
        ("a..b", "is not a host name"),
    ],
)
def test_bad_host_names(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        host_name(text)


def test_ip_addresses_are_canonical() -> None:
    assert ip_address("::0001") == "::1"
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 address"):
        ip_address("jobs.example.org")


def test_add_client_issues_and_whitelists(pki: PkiPaths) -> None:
    added = add_client(pki.directory, "carol", "admin")
    assert added.whitelisted
    cert = _cert(added.files.cert)
    cert.verify_directly_issued_by(_cert(pki.ca_cert))
    assert added.files.key.stat().st_mode & 0o777 == 0o600
    authz = Authz.from_file(pki.authz)
    assert set(authz.clients) == {"alice", "carol"}
    assert authz.clients["carol"].role.value == "admin"


def test_add_client_refuses_a_taken_name_or_another_role(pki: PkiPaths) -> None:
    with pytest.raises(InvalidArgument, match="has a certificate already"):
        add_client(pki.directory, "alice", "user")
    with pytest.raises(InvalidArgument, match="lists 'alice' as user: change the role there"):
        add_client(pki.directory, "alice", "admin")
    with pytest.raises(InvalidArgument, match="client name 'ca'"):
        add_client(pki.directory, "ca", "user")


def test_commands_on_a_directory_without_ca_say_how_to_make_one(tmp_path: Path) -> None:
    for act in (
        lambda: add_client(tmp_path, "bob", "user"),
        lambda: revoke_client(tmp_path, "bob"),
        lambda: renew_server(tmp_path),
        lambda: refresh_crl(tmp_path),
    ):
        with pytest.raises(
            ConfigError, match=f"create one with `jobworker certs init --dir {tmp_path}`"
        ):
            act()


def test_revoke_lists_the_serial_and_frees_the_name(pki: PkiPaths) -> None:
    serial = _cert(pki.client_cert("alice")).serial_number
    revoked = revoke_client(pki.directory, "alice")
    assert revoked.serial == serial
    assert [entry.serial_number for entry in _crl(pki)] == [serial]
    assert not pki.client_cert("alice").exists() and not pki.client_key("alice").exists()
    assert {path.name for path in revoked.moved} == {
        f"{serial:x}-alice.pem",
        f"{serial:x}-alice-key.pem",
    }
    assert all(path.parent == pki.revoked for path in revoked.moved)
    # A new certificate for the same entry; the whitelist is not listed twice.
    again = add_client(pki.directory, "alice", "user")
    assert not again.whitelisted
    assert pki.authz.read_text().count('identity = "alice"') == 1
    second = revoke_client(pki.directory, "alice")
    assert second.crl.revoked == 2
    assert {entry.serial_number for entry in _crl(pki)} == {serial, second.serial}
    with pytest.raises(InvalidArgument, match="no client 'alice' to revoke"):
        revoke_client(pki.directory, "alice")


def test_refresh_keeps_the_revoked_and_moves_the_next_update(pki: PkiPaths) -> None:
    serial = revoke_client(pki.directory, "alice").serial
    before = _crl(pki).next_update_utc
    state = refresh_crl(pki.directory)
    assert [entry.serial_number for entry in _crl(pki)] == [serial]
    assert before is not None and state.next_update >= before


def test_a_crl_of_another_ca_is_not_extended(pki: PkiPaths, tmp_path: Path) -> None:
    other = init_pki(tmp_path / "other")
    pki.crl.write_bytes(other.crl.read_bytes())
    with pytest.raises(ConfigError, match="is not signed by"):
        refresh_crl(pki.directory)


def test_renew_server_keeps_its_names_or_takes_new_ones(pki: PkiPaths) -> None:
    old = _cert(pki.server_cert)
    renewed = renew_server(pki.directory)
    assert renewed.names == ("jobs.example.org", "10.0.0.5")
    new = _cert(pki.server_cert)
    assert new.serial_number != old.serial_number
    new.verify_directly_issued_by(_cert(pki.ca_cert))
    assert pki.server_key.stat().st_mode & 0o777 == 0o600
    renewed = renew_server(pki.directory, ["localhost", "127.0.0.1"])
    assert certificate_names(pki.server_cert) == ["localhost", "127.0.0.1"]
    assert renewed.names == ("localhost", "127.0.0.1")

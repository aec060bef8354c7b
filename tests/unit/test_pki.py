"""The development PKI: files, permissions, certificate contents, idempotence."""

from __future__ import annotations

import ipaddress
import socket
import stat
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.api.pki import (
    PkiPaths,
    default_server_names,
    init_pki,
    issue_client_cert,
    make_ca,
    write_crl,
)
from jobworker.api.tlsfiles import default_pki_dir
from jobworker.errors import ConfigError, InvalidArgument


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(
        tmp_path_factory.mktemp("pki") / "pki", clients=[("alice", "user"), ("root", "admin")]
    )


def test_default_dir_prefers_jobworker_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBWORKER_HOME", "/srv/jw")
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg")
    assert default_pki_dir() == Path("/srv/jw")


def test_default_dir_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBWORKER_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg")
    assert default_pki_dir() == Path("/xdg/jobworker/pki")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_pki_dir() == Path("/home/u/.local/share/jobworker/pki")


def test_creates_every_file_with_safe_modes(pki: PkiPaths) -> None:
    names = {path.name for path in pki.created}
    assert names == {
        "ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "alice.pem", "alice-key.pem",
        "root.pem", "root-key.pem", "authz.toml", "ca.crl",
    }  # fmt: skip
    assert pki.existing == ()
    assert _mode(pki.directory) == 0o700
    for key in (pki.ca_key, pki.server_key, pki.client_key("alice"), pki.client_key("root")):
        assert _mode(key) == 0o600, key
    assert _mode(pki.ca_cert) == 0o644


def test_tls_files_point_into_the_directory(pki: PkiPaths) -> None:
    alice = pki.client("alice")
    assert (alice.cert, alice.key, alice.ca) == (
        pki.directory / "alice.pem",
        pki.directory / "alice-key.pem",
        pki.directory / "ca.pem",
    )
    assert pki.server().cert == pki.directory / "server.pem"


def test_server_certificate(pki: PkiPaths) -> None:
    cert = _cert(pki.server_cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert set(default_server_names()) >= {"localhost", socket.gethostname()}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", socket.gethostname()}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(_cert(pki.ca_cert))


def test_client_certificate(pki: PkiPaths) -> None:
    cert = _cert(pki.client_cert("alice"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["alice"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(_cert(pki.ca_cert))


def test_ca_certificate(pki: PkiPaths) -> None:
    constraints = _cert(pki.ca_cert).extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca


def test_authz_whitelist(pki: PkiPaths) -> None:
    assert tomllib.loads(pki.authz.read_text()) == {
        "clients": [
            {"identity": "alice", "role": "user"},
            {"identity": "root", "role": "admin"},
        ]
    }


def test_rerun_keeps_everything_and_adds_new_clients(tmp_path: Path) -> None:
    first = init_pki(tmp_path / "pki")
    before = {path: path.read_bytes() for path in first.created}
    second = init_pki(tmp_path / "pki", clients=[("admin", "admin"), ("bob", "user")])
    assert {path.name for path in second.created} == {"bob.pem", "bob-key.pem"}
    assert set(second.existing) == set(before)
    assert all(path.read_bytes() == data for path, data in before.items())
    # The whitelist is the operator's: bob is not added behind their back.
    assert "bob" not in second.authz.read_text()
    _cert(second.client_cert("bob")).verify_directly_issued_by(_cert(second.ca_cert))


def test_default_clients_are_one_admin(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki", server_names=["jobs.example.org", "192.0.2.7"])
    assert tomllib.loads(paths.authz.read_text()) == {
        "clients": [{"identity": "admin", "role": "admin"}]
    }
    sans = _cert(paths.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.DNSName) == ["jobs.example.org"]
    assert sans.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]


def test_half_a_ca_is_an_error(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    paths.ca_key.unlink()
    with pytest.raises(ConfigError, match=r"only one of ca\.pem and ca-key\.pem"):
        init_pki(tmp_path / "pki")


def test_certificate_from_a_replaced_ca_is_an_error(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    paths.ca_cert.unlink()
    paths.ca_key.unlink()
    with pytest.raises(ConfigError, match=r"server\.pem was not issued by .*remove it"):
        init_pki(tmp_path / "pki")


@pytest.mark.parametrize("name", ["ca", "server", "authz", "alice-key", "../x", "", "a b"])
def test_unsafe_client_names_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument, match="client name"):
        init_pki(tmp_path / "pki", clients=[(name, "user")])
    assert not (tmp_path / "pki").exists()


def test_unknown_role_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="role 'root' is not one of"):
        init_pki(tmp_path / "pki", clients=[("alice", "root")])


def test_issue_client_cert_with_explicit_validity() -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    issued = issue_client_cert(
        make_ca("test CA"), "old", not_before=now - timedelta(days=10), not_after=now
    )
    assert issued.cert.not_valid_before_utc == now - timedelta(days=10)
    assert issued.cert.not_valid_after_utc == now
    assert issued.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_write_crl(tmp_path: Path) -> None:
    ca = make_ca("test CA")
    next_update = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    path = write_crl(ca, [7, 9], tmp_path / "ca.crl", next_update=next_update)
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert sorted(revoked.serial_number for revoked in crl) == [7, 9]
    assert crl.next_update_utc == next_update
    assert crl.issuer == ca.cert.subject

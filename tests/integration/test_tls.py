"""Real mutual TLS on 127.0.0.1: what the server accepts, refuses, and at which stage."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from grpc_health.v1 import health_pb2

from jobworker.api.pki import PkiPaths, default_server_names, make_ca, write_crl
from jobworker.api.tls import TLS12_REFUSING_CIPHER_SUITES, RevocationList, server_credentials
from jobworker.api.tlsfiles import TlsFiles
from jobworker.client import channel_credentials
from jobworker.errors import ConfigError
from tests.tlsfixtures import (
    add_client,
    health_check,
    identity_server,
    make_test_pki,
    raw_channel_credentials,
    whoami,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return make_test_pki(tmp_path / "pki")


@pytest.fixture
def port(pki: PkiPaths) -> object:
    with identity_server(pki.server()) as port:
        yield port


def _refused_at_handshake(port: int, credentials: grpc.ChannelCredentials) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        whoami(port, credentials)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# --- what a server accepts --------------------------------------------------------------


def test_valid_client_is_identified(pki: PkiPaths, port: int) -> None:
    assert whoami(port, channel_credentials(pki.client("alice"))) == {
        "common_name": "alice",
        "sans": ["alice"],
    }
    assert whoami(port, channel_credentials(pki.client("admin")))["common_name"] == "admin"


def test_health_service_answers_over_mtls(pki: PkiPaths, port: int) -> None:
    credentials = channel_credentials(pki.client("alice"))
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        assert health_check(channel) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", [*default_server_names()])
def test_server_certificate_covers_default_names(pki: PkiPaths, port: int, name: str) -> None:
    # grpc checks this name against the server certificate's SANs (IP SANs for addresses).
    options = [("grpc.ssl_target_name_override", name)]
    credentials = channel_credentials(pki.client("alice"))
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        assert health_check(channel) == health_pb2.HealthCheckResponse.SERVING


def test_client_refuses_server_with_wrong_name(pki: PkiPaths, port: int) -> None:
    options = [("grpc.ssl_target_name_override", "not-this-server.example")]
    credentials = channel_credentials(pki.client("alice"))
    with (
        grpc.secure_channel(f"localhost:{port}", credentials, options) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        health_check(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# --- what the handshake refuses ---------------------------------------------------------


def _s_client(port: int, files: TlsFiles, version_flag: str) -> subprocess.CompletedProcess[str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl binary is not installed")
    return subprocess.run(
        [
            openssl,
            "s_client",
            "-brief",
            "-connect",
            f"127.0.0.1:{port}",
            version_flag,
            "-alpn",
            "h2",
            "-cert",
            str(files.cert),
            "-key",
            str(files.key),
            "-CAfile",
            str(files.ca),
            "-verify_return_error",
        ],
        input="",
        capture_output=True,
        text=True,
        errors="replace",
        timeout=20,
        check=False,
    )


def test_tls13_handshake_succeeds(pki: PkiPaths, port: int) -> None:
    result = _s_client(port, pki.client("alice"), "-tls1_3")
    assert "Protocol version: TLSv1.3" in result.stderr + result.stdout, result.stderr


def test_tls12_refused_at_handshake(pki: PkiPaths, port: int) -> None:
    # With a valid client certificate: the refusal is about the protocol version only.
    result = _s_client(port, pki.client("alice"), "-tls1_2")
    output = result.stderr + result.stdout
    assert result.returncode != 0
    assert "Protocol version" not in output
    # The TCP connection was made and the TLS layer failed (the server hung up
    # mid-handshake), not a dead port ("system library") or a flag openssl rejected.
    assert re.search(r":error:[0-9A-F]+:SSL routines:", output), output
    # The same client on the same port, with TLS 1.3, is accepted.
    accepted = _s_client(port, pki.client("alice"), "-tls1_3")
    assert "Protocol version: TLSv1.3" in accepted.stderr + accepted.stdout


def test_plaintext_refused(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as e:
        health_check(channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_refused(pki: PkiPaths, port: int) -> None:
    credentials = raw_channel_credentials(pki.client("alice"), with_client_cert=False)
    _refused_at_handshake(port, credentials)


def test_certificate_from_foreign_ca_refused(pki: PkiPaths, port: int) -> None:
    mallory = add_client(pki, "mallory", ca=make_ca("jobworker dev CA"))
    _refused_at_handshake(port, raw_channel_credentials(mallory))


def test_expired_certificate_refused(pki: PkiPaths, port: int) -> None:
    now = datetime.now(UTC)
    old = add_client(pki, "old", not_before=now - timedelta(days=30), not_after=now - timedelta(1))
    _refused_at_handshake(port, raw_channel_credentials(old))
    with pytest.raises(ConfigError, match=r"certificate .*old\.pem expired"):
        channel_credentials(old)


# --- revocation: the handshake succeeds, every RPC is refused ---------------------------


def test_revoked_certificate_handshakes_but_rpc_is_unauthenticated(pki: PkiPaths) -> None:
    bob = add_client(pki, "bob")
    bob_serial = _serial(bob.cert)
    crl = RevocationList(
        write_crl(pki.load_ca(), [bob_serial], pki.directory / "ca.crl"), pki.ca_cert
    )
    with identity_server(pki.server(), crl) as port:
        # The handshake completes: a service that skips check_peer still answers bob.
        with grpc.secure_channel(f"localhost:{port}", channel_credentials(bob)) as channel:
            assert health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            whoami(port, channel_credentials(bob))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert f"bob: the client certificate (serial {bob_serial:#x}) was revoked" in str(
            refused.value.details()
        )
        assert whoami(port, channel_credentials(pki.client("alice")))["common_name"] == "alice"


def _serial(cert_path: Path) -> int:
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number


def test_expired_crl_refuses_everyone(pki: PkiPaths) -> None:
    now = datetime.now(UTC)
    path = write_crl(
        pki.load_ca(),
        [],
        pki.directory / "ca.crl",
        last_update=now - timedelta(days=8),
        next_update=now - timedelta(days=1),
    )
    crl = RevocationList(path, pki.ca_cert)
    with identity_server(pki.server(), crl) as port, pytest.raises(grpc.RpcError) as refused:
        whoami(port, channel_credentials(pki.client("alice")))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "CRL expired" in str(refused.value.details())


def test_reload_picks_up_new_revocations(pki: PkiPaths) -> None:
    path = write_crl(pki.load_ca(), [], pki.directory / "ca.crl")
    crl = RevocationList(path, pki.ca_cert)
    alice = pki.client("alice")
    with identity_server(pki.server(), crl) as port:
        assert whoami(port, channel_credentials(alice))["common_name"] == "alice"
        write_crl(pki.load_ca(), [_serial(alice.cert)], path)
        crl.reload()
        with pytest.raises(grpc.RpcError) as refused:
            whoami(port, channel_credentials(alice))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- start-up refuses bad configuration -------------------------------------------------


def test_crl_signed_by_another_ca_refused_at_load(pki: PkiPaths) -> None:
    # Same issuer name as the real CA, different key: only the signature tells them apart.
    forged = write_crl(make_ca("jobworker dev CA"), [], pki.directory / "forged.crl")
    with pytest.raises(ConfigError, match=r"forged\.crl .* is not signed by a CA in"):
        RevocationList(forged, pki.ca_cert)


def test_failed_reload_keeps_the_previous_list(pki: PkiPaths) -> None:
    alice = pki.client("alice")
    path = write_crl(pki.load_ca(), [_serial(alice.cert)], pki.directory / "ca.crl")
    crl = RevocationList(path, pki.ca_cert)
    path.write_bytes(b"not a crl")
    with pytest.raises(ConfigError, match="neither a PEM nor a DER CRL"):
        crl.reload()
    assert crl.is_revoked(alice.cert.read_bytes())


def test_der_crl_accepted(pki: PkiPaths) -> None:
    alice = pki.client("alice")
    pem = write_crl(pki.load_ca(), [_serial(alice.cert)], pki.directory / "ca.crl")
    der = pki.directory / "ca.crl.der"
    der.write_bytes(x509.load_pem_x509_crl(pem.read_bytes()).public_bytes(Encoding.DER))
    crl = RevocationList(der, pki.ca_cert)
    assert crl.is_revoked(alice.cert.read_bytes())
    assert not crl.is_revoked(pki.client_cert("admin").read_bytes())


def test_missing_files_are_named(pki: PkiPaths, tmp_path: Path) -> None:
    files = pki.server()
    for field in ("cert", "key", "ca"):
        broken = files._replace(**{field: tmp_path / f"missing-{field}.pem"})
        with pytest.raises(ConfigError, match=rf"missing-{field}\.pem does not exist"):
            server_credentials(broken)


def test_mismatched_key_is_named_without_its_content(pki: PkiPaths) -> None:
    files = TlsFiles(cert=pki.server_cert, key=pki.client_key("alice"), ca=pki.ca_cert)
    with pytest.raises(ConfigError) as err:
        server_credentials(files)
    message = str(err.value)
    assert f"private key {pki.client_key('alice')} does not belong to certificate" in message
    assert "PRIVATE KEY" not in message
    assert pki.client_key("alice").read_text().splitlines()[1] not in message


def test_garbage_key_and_cert_are_named(pki: PkiPaths, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    garbage.chmod(0o600)
    with pytest.raises(ConfigError, match=r"certificate .*garbage\.pem holds no PEM certificate"):
        server_credentials(TlsFiles(cert=garbage, key=pki.server_key, ca=pki.ca_cert))
    with pytest.raises(ConfigError, match=r"private key .*garbage\.pem is not a PEM private key"):
        server_credentials(TlsFiles(cert=pki.server_cert, key=garbage, ca=pki.ca_cert))


def test_key_readable_by_others_refused(pki: PkiPaths) -> None:
    pki.server_key.chmod(0o640)
    with pytest.raises(ConfigError, match=r"accessible by other users .* chmod 600"):
        server_credentials(pki.server())


_LOAD_AS_NOBODY = """
import os, sys
from jobworker.errors import ConfigError
from jobworker.api.tls import server_credentials
from jobworker.api.tlsfiles import TlsFiles
if os.geteuid() == 0:  # root reads any file: become nobody (every capability goes too)
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
try:
    server_credentials(TlsFiles(*sys.argv[1:4]))
except ConfigError as err:
    print(err)
    sys.exit(3)
"""


def test_unreadable_file_named(pki: PkiPaths, tmp_path: Path) -> None:
    """Run as nobody when the tests run as root, so that the mode bits count."""
    # A directory nobody may enter (pytest's tmp_path is private to its user), with the
    # certificate and key nobody's own and the CA bundle readable by no one.
    shared = Path(tempfile.mkdtemp(prefix="jobworker-unreadable-"))
    try:
        files = [shared / "server.pem", shared / "server.key", shared / "ca.pem"]
        for source, target in zip(
            (pki.server_cert, pki.server_key, pki.ca_cert), files, strict=True
        ):
            shutil.copyfile(source, target)
            target.chmod(0o600)
        files[2].chmod(0)
        if os.geteuid() == 0:
            for path in (shared, *files):
                os.chown(path, 65534, 65534)
        result = subprocess.run(
            [sys.executable, "-c", _LOAD_AS_NOBODY, *map(str, files)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        shutil.rmtree(shared)
    assert result.returncode == 3, result.stdout + result.stderr
    uid = 65534 if os.geteuid() == 0 else os.getuid()
    assert result.stdout.strip() == f"CA bundle {files[2]} is not readable by uid {uid}"


# --- the process-wide cipher setting and import order -----------------------------------

_BUILD_CREDENTIALS = """
import os, sys
{imports}
from jobworker.errors import ConfigError
from jobworker.api.tls import server_credentials
from jobworker.api.tlsfiles import TlsFiles
assert os.environ.get("GRPC_SSL_CIPHER_SUITES") == {expected_env!r}, "environment leaked"
try:
    server_credentials(TlsFiles(*sys.argv[1:4]))
except ConfigError as err:
    print(err)
    sys.exit(3)
"""


@pytest.mark.parametrize(
    ("imports", "preset", "refused"),
    [
        ("import jobworker.api.tls\nimport grpc", None, False),
        ("import grpc\nimport jobworker.api.tls", None, True),
        ("import grpc\nimport jobworker.api.tls", TLS12_REFUSING_CIPHER_SUITES, False),
    ],
    ids=["tls-first", "grpc-first", "grpc-first-env-preset"],
)
def test_tls12_guard_depends_on_import_order(
    pki: PkiPaths, imports: str, preset: str | None, refused: bool
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_SSL_CIPHER_SUITES"}
    if preset is not None:
        env["GRPC_SSL_CIPHER_SUITES"] = preset
    files = pki.server()
    code = _BUILD_CREDENTIALS.format(imports=imports, expected_env=preset)
    result = subprocess.run(
        [sys.executable, "-c", code, str(files.cert), str(files.key), str(files.ca)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    if refused:
        assert result.returncode == 3, result.stderr
        assert "import jobworker.api.tls before grpc" in result.stdout
    else:
        assert result.returncode == 0, result.stdout + result.stderr

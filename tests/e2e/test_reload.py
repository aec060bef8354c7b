"""SIGHUP to a real ``jobworker serve``: the CRL, the whitelist and the server certificate
are reloaded together or not at all, a bad file is named in the log, no job is touched,
and the CRL's coming expiry is logged without waiting for a client."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from jobworker.api.pki import PkiPaths, issue_server_cert, write_crl
from tests.e2e.conftest import Cli, Pki, Server, StartServer

HUP_TIMEOUT_S = 15.0


def wait_for_event(server: Server, event: str, after: int = 0) -> dict[str, object]:
    """The first log event named ``event`` among those after the first ``after``."""
    deadline = time.monotonic() + HUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for entry in server.events()[after:]:
            if entry["event"] == event:
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no {event} in the server log:\n{server.log()}")


def hup(server: Server, until: str) -> dict[str, object]:
    """Send SIGHUP and wait for the log event ``until`` it causes."""
    seen = len(server.events())
    server.process.send_signal(signal.SIGHUP)
    return wait_for_event(server, until, after=seen)


def replace(path: Path, write: Callable[[Path], object]) -> None:
    """Write a new version of ``path`` next to it and rename it in, as an operator would."""
    new = path.with_name(path.name + ".new")
    write(new)
    os.replace(new, path)


def served_certificate(address: str, pki: Path, client: str = "alice") -> x509.Certificate:
    """The certificate a new connection's handshake presents (as ``client``)."""
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    context.load_cert_chain(pki / f"{client}.pem", pki / f"{client}-key.pem")
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_sighup_reloads_whitelist_crl_and_certificate_atomically(
    pki: Pki, start_server: StartServer, tmp_path: Path
) -> None:
    directory = tmp_path / "pki"
    shutil.copytree(pki.directory, directory)
    paths = PkiPaths(directory)
    ca = paths.load_ca()
    crl = write_crl(
        ca, [], directory / "ca.crl", next_update=datetime.now(UTC) + timedelta(hours=2)
    )
    whitelist = directory / "authz.toml"
    original = whitelist.read_text()
    copy = Pki(directory=directory, init_output="")
    server = start_server(
        *copy.server_args(), f"--tls-crl={crl}", f"--spool-dir={tmp_path / 'spool'}"
    )
    cli = Cli(pki=copy, server=server)
    # A CRL expiring within a day is an error in the log at once, naming the file.
    soon = wait_for_event(server, "crl_expires_soon")
    assert soon["path"] == str(crl)

    job_id = cli.ok("start", "--", "sleep", "600").strip()
    assert cli("list", as_="mallory").returncode == 1

    # A whitelist that does not parse: nothing changes, the log names file and line.
    whitelist.write_text(original + '\n[[clients]]\nidentity = "mallory"\nrole = \n')
    failed = hup(server, "reload_failed")
    assert str(whitelist) in str(failed["error"]) and "line" in str(failed["error"])
    assert server.process.poll() is None
    assert cli("list", as_="mallory").returncode == 1

    # A good whitelist with a bad CRL: neither is put in force.
    whitelist.write_text(original + '\n[[clients]]\nidentity = "mallory"\nrole = "user"\n')
    crl_text = crl.read_bytes()
    crl.write_text("not a CRL")
    failed = hup(server, "reload_failed")
    assert str(crl) in str(failed["error"])
    assert cli("list", as_="mallory").returncode == 1

    # Both good, alice revoked, and a new server certificate: all in force together.
    crl.write_bytes(crl_text)
    alice_serial = x509.load_pem_x509_certificate((directory / "alice.pem").read_bytes())
    replace(crl, lambda p: write_crl(ca, [alice_serial.serial_number], p))
    old_serial = served_certificate(server.address, directory).serial_number
    fresh = issue_server_cert(ca, ["localhost", "127.0.0.1"])
    replace(paths.server_key, lambda p: (p.touch(0o600), p.write_bytes(fresh.key_pem)))
    replace(paths.server_cert, lambda p: p.write_bytes(fresh.cert_pem))
    hup(server, "reload_done")
    assert cli.ok("list", as_="mallory") is not None
    refused = cli("list", as_="alice")
    assert refused.returncode == 1 and b"UNAUTHENTICATED" in refused.stderr
    served = served_certificate(server.address, directory)
    assert served.serial_number == fresh.cert.serial_number != old_serial

    # No job was touched: alice's job still runs, as root (admin) sees.
    assert cli.status(job_id, as_="root")["state"] == "running"
    assert server.process.poll() is None


def test_crl_expiry_is_logged_when_it_happens(
    pki: Pki, start_server: StartServer, tmp_path: Path
) -> None:
    ca = PkiPaths(pki.directory).load_ca()
    expires = datetime.now(UTC) + timedelta(seconds=3)
    crl = write_crl(ca, [], tmp_path / "ca.crl", next_update=expires)
    server = start_server(*pki.server_args(), f"--tls-crl={crl}")
    expired = wait_for_event(server, "crl_expired")
    assert expired["path"] == str(crl)
    assert datetime.fromisoformat(str(expired["timestamp"])) >= expires - timedelta(seconds=1)


def scrape(address: str, pki: Path, client: str) -> bool:
    """Whether ``client`` may scrape the metrics port over TLS (and got the metrics)."""
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    context.check_hostname = False  # the certificate names localhost, the URL the address
    context.load_cert_chain(pki / f"{client}.pem", pki / f"{client}-key.pem")
    try:
        with urllib.request.urlopen(
            f"https://{address}/metrics", timeout=10, context=context
        ) as response:
            return b"jobworker_jobs_running" in response.read()
    except OSError:  # refused after the handshake: the connection is closed unanswered
        return False


def test_sighup_reloads_the_metrics_port_crl_whitelist_and_certificate(
    pki: Pki, start_server: StartServer, tmp_path: Path
) -> None:
    directory = tmp_path / "pki"
    shutil.copytree(pki.directory, directory)
    paths = PkiPaths(directory)
    ca = paths.load_ca()
    crl = write_crl(ca, [], directory / "ca.crl")
    whitelist = directory / "authz.toml"
    original = whitelist.read_text()
    server = start_server(
        *Pki(directory=directory, init_output="").server_args(), f"--tls-crl={crl}",
        "--plugin", "metrics", "--metrics-listen", "127.0.0.1:0", "--metrics-tls",
    )  # fmt: skip
    metrics = str(wait_for_event(server, "metrics_listening")["address"])
    assert scrape(metrics, directory, "alice")
    assert not scrape(metrics, directory, "mallory")  # signed by the CA, not on the whitelist

    # A bad CRL: nothing changes on either port.
    whitelist.write_text(original + '\n[[clients]]\nidentity = "mallory"\nrole = "user"\n')
    crl_text = crl.read_bytes()
    crl.write_text("not a CRL")
    hup(server, "reload_failed")
    assert scrape(metrics, directory, "alice")
    assert not scrape(metrics, directory, "mallory")

    # alice revoked, mallory whitelisted, a new server certificate: all in force at once.
    crl.write_bytes(crl_text)
    alice = x509.load_pem_x509_certificate((directory / "alice.pem").read_bytes())
    replace(crl, lambda p: write_crl(ca, [alice.serial_number], p))
    fresh = issue_server_cert(ca, ["localhost", "127.0.0.1"])
    replace(paths.server_key, lambda p: (p.touch(0o600), p.write_bytes(fresh.key_pem)))
    replace(paths.server_cert, lambda p: p.write_bytes(fresh.cert_pem))
    hup(server, "reload_done")
    assert not scrape(metrics, directory, "alice")
    assert scrape(metrics, directory, "mallory")
    assert (
        served_certificate(metrics, directory, "mallory").serial_number == fresh.cert.serial_number
    )
    refused = [e for e in server.events() if e["event"] == "metrics_scrape_refused"]
    assert refused[-1]["identity"] == "alice" and refused[-1]["revoked"] is True

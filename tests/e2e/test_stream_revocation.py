"""A client revoked by a SIGHUP reload loses its open streams, not only its next RPCs."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from jobworker.api.pki import PkiPaths, write_crl
from tests.e2e.conftest import JOBWORKER, Cli, Pki, StartServer
from tests.e2e.test_reload import hup, replace

#: How long `logs -f` may take, at most, to end once the reload is done (about a second
#: is the design; the bound only keeps a broken server from hanging the test).
BOUND = 15.0


def test_a_revoked_client_loses_its_open_stream_at_the_reload(
    pki: Pki, start_server: StartServer, tmp_path: Path
) -> None:
    directory = tmp_path / "pki"
    shutil.copytree(pki.directory, directory)
    ca = PkiPaths(directory).load_ca()
    next_update = datetime.now(UTC) + timedelta(days=7)
    crl = write_crl(ca, [], directory / "ca.crl", next_update=next_update)
    copy = Pki(directory=directory, init_output="")
    server = start_server(
        *copy.server_args(), f"--tls-crl={crl}", f"--spool-dir={tmp_path / 'spool'}"
    )
    cli = Cli(pki=copy, server=server)
    job_id = cli.ok("start", "--", "sh", "-c", "while :; do echo tick; sleep 0.1; done").strip()
    follow = subprocess.Popen(
        [JOBWORKER, "logs", "-f", "--", job_id],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli.env("alice"),
    )
    try:
        assert follow.stdout is not None
        assert follow.stdout.readline() == b"tick\n"  # the stream is live
        alice = x509.load_pem_x509_certificate((directory / "alice.pem").read_bytes())
        replace(crl, lambda p: write_crl(ca, [alice.serial_number], p, next_update=next_update))
        hup(server, "reload_done")
        _, stderr = follow.communicate(timeout=BOUND)
    finally:
        follow.kill()
        follow.wait()
    assert follow.returncode == 1
    assert stderr.decode().startswith("jobworker: UNAUTHENTICATED: alice: the client certificate")
    assert "was revoked on" in stderr.decode()
    # The job goes on (the admin sees it), and other clients' streams are not touched.
    assert cli.status(job_id, as_="root")["state"] == "running"
    assert cli.ok("logs", "--", job_id, as_="root").startswith("tick\n")

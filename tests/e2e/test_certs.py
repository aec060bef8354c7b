"""The life of a PKI through the real CLI and server: the README's production example
pasted, then a client added, one revoked and the server certificate renewed, each put in
force by SIGHUP; and the one-line error of a client dialling a name the certificate lacks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.conftest import (
    JOBWORKER,
    Server,
    StartServer,
    clean_env,
    free_port,
    jobworker,
)
from tests.e2e.test_reload import hup, served_certificate

README = Path(__file__).resolve().parents[2] / "README.md"


def production_blocks() -> list[str]:
    section = README.read_text().split("## Production set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def paste(block: str, directory: Path, port: int) -> str:
    """The block as this machine runs it: its own directory, and loopback for 10.0.0.5."""
    for old, new in (
        ("/etc/jobworker", str(directory)),
        ("jobs.example.com", "localhost"),
        ("10.0.0.5:50051", f"127.0.0.1:{port}"),
        ("10.0.0.5", "127.0.0.1"),
    ):
        block = block.replace(old, new)
    return block


def _cgroup_root() -> Path:
    """A cgroup of this test's own for ``--plugin cgroupv2`` (the hybrid host's v2 tree)."""
    unified = Path("/sys/fs/cgroup/unified")
    base = unified if (unified / "cgroup.procs").exists() else Path("/sys/fs/cgroup")
    return base / f"jobworker-e2e-certs-{os.getpid()}"


def exports(init_output: str, client: str, port: int) -> dict[str, str]:
    """The ``export`` line ``certs init`` printed for ``client``, aimed at ``port``."""
    lines = init_output.split(f"connect as {client} ", 1)[1].splitlines()
    words = shlex.split(lines[1].replace(":50051", f":{port}"))
    assert words[0] == "export"
    return dict(word.split("=", 1) for word in words[1:])


@pytest.fixture
def production(tmp_path: Path) -> Iterator[tuple[Server, Path, str]]:
    """The README's two blocks, pasted: ``certs init``, then ``serve`` (with a spool and
    cgroup root of the test's own, the only additions)."""
    blocks = production_blocks()
    assert len(blocks) == 2, blocks
    directory, port = tmp_path / "etc-jobworker", free_port()
    env = clean_env(
        JOBWORKER_HOME=str(tmp_path / "home"),
        PATH=f"{Path(JOBWORKER).parent}:{os.environ['PATH']}",
    )
    init = subprocess.run(
        ["sh", "-ec", paste(blocks[0], directory, port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    serve = paste(blocks[1], directory, port).replace("\\\n", " ").strip()
    extra = f" --spool-dir {tmp_path / 'spool'} --cgroup-root {_cgroup_root()}"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["sh", "-c", f"exec {serve}{extra}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(process=process, address=f"127.0.0.1:{port}", log_path=log_path)
    try:
        server.wait_ready()
        yield server, directory, init.stdout
    finally:
        assert server.terminate() == 0, server.log()
        assert not _cgroup_root().exists()


def test_the_production_example_then_add_revoke_renew(
    production: tuple[Server, Path, str], tmp_path: Path
) -> None:
    server, directory, printed = production
    port = int(server.address.rsplit(":", 1)[1])
    alice = clean_env(JOBWORKER_HOME=str(tmp_path / "none"), **exports(printed, "alice", port))
    ops = clean_env(JOBWORKER_HOME=str(tmp_path / "none"), **exports(printed, "ops", port))
    assert alice["JOBWORKER_SERVER"] == f"localhost:{port}"  # the --host name, dialled

    ran = jobworker("run", "--", "echo", "hello", env=alice)
    assert (ran.returncode, ran.stdout) == (0, b"hello\n"), ran.stderr
    assert jobworker("list", env=ops).returncode == 0

    # A new client: its certificate works once the server has re-read the whitelist.
    added = jobworker("certs", "add-client", "--dir", str(directory), "carol:user", env=ops)
    assert added.returncode == 0, added.stderr
    assert b"kill -HUP <server pid>" in added.stdout
    carol = dict(
        alice,
        JOBWORKER_TLS_CERT=str(directory / "carol.pem"),
        JOBWORKER_TLS_KEY=str(directory / "carol-key.pem"),
    )
    before = jobworker("list", env=carol)
    assert before.returncode == 1 and b"PERMISSION_DENIED" in before.stderr
    hup(server, "reload_done")
    assert jobworker("list", env=carol).returncode == 0

    # alice revoked: the CRL refuses her after the reload; her files moved aside.
    revoked = jobworker("certs", "revoke", "--dir", str(directory), "alice", env=ops)
    assert revoked.returncode == 0, revoked.stderr
    assert b"until then alice can still connect" in revoked.stdout
    assert not (directory / "alice.pem").exists()
    hup(server, "reload_done")
    refused = jobworker("list", env=dict(
        alice,
        JOBWORKER_TLS_CERT=str(next((directory / "revoked").glob("*-alice.pem"))),
        JOBWORKER_TLS_KEY=str(next((directory / "revoked").glob("*-alice-key.pem"))),
    ))  # fmt: skip
    assert refused.returncode == 1 and b"UNAUTHENTICATED" in refused.stderr

    # The listing says who holds what.
    listed = jobworker("certs", "list", "--dir", str(directory), "--json", env=ops)
    assert listed.returncode == 0, listed.stderr
    states = {(c["name"], c["role"], c["state"]) for c in json.loads(listed.stdout)["certificates"]}
    assert states == {
        ("server", None, "valid"),
        ("ops", "admin", "valid"),
        ("carol", "user", "valid"),
        ("alice", "user", "revoked"),
    }
    table = jobworker("certs", "list", "--dir", str(directory), env=ops).stdout.decode()
    assert re.search(r"^alice +user +\S+ \S+ +revoked$", table, re.M), table
    assert "the server certificate names localhost, 127.0.0.1" in table

    # A new server certificate, same names: served after the reload, clients unchanged.
    old = served_certificate(server.address, directory, client="ops")
    renewed = jobworker("certs", "renew-server", "--dir", str(directory), env=ops)
    assert renewed.returncode == 0, renewed.stderr
    assert b"names localhost, 127.0.0.1" in renewed.stdout
    hup(server, "reload_done")
    new = served_certificate(server.address, directory, client="ops")
    fresh = x509.load_pem_x509_certificate((directory / "server.pem").read_bytes())
    assert new.serial_number == fresh.serial_number != old.serial_number
    assert jobworker("list", env=ops).returncode == 0

    # The CRL re-signed keeps alice revoked.
    assert jobworker("certs", "crl", "--dir", str(directory), env=ops).returncode == 0
    hup(server, "reload_done")
    assert jobworker("list", env=carol).returncode == 0


def test_a_host_the_certificate_does_not_name_is_named_in_the_error(
    start_server: StartServer, tmp_path: Path
) -> None:
    directory = tmp_path / "pki"
    env = clean_env(JOBWORKER_HOME=str(tmp_path / "home"))
    made = jobworker(
        "certs", "init", "--dir", str(directory), "--host", "jobs.example.com", env=env
    )
    assert made.returncode == 0, made.stderr
    # A host name alone: the suggested server listens where that name may lead.
    assert b"start the server (every interface; --ip names one):" in made.stdout
    assert b"jobworker serve --listen 0.0.0.0:50051 " in made.stdout
    server = start_server(
        f"--tls-cert={directory / 'server.pem'}",
        f"--tls-key={directory / 'server-key.pem'}",
        f"--tls-ca={directory / 'ca.pem'}",
        f"--authz={directory / 'authz.toml'}",
        f"--spool-dir={tmp_path / 'spool'}",
    )
    client = clean_env(
        JOBWORKER_HOME=str(tmp_path / "none"),
        JOBWORKER_SERVER=server.address,
        JOBWORKER_TLS_CERT=str(directory / "admin.pem"),
        JOBWORKER_TLS_KEY=str(directory / "admin-key.pem"),
        JOBWORKER_TLS_CA=str(directory / "ca.pem"),
    )
    result = jobworker("list", env=client)
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"jobworker: UNAVAILABLE: the server at {server.address} has a certificate that does"
        " not name the host dialled (127.0.0.1): dial a name it lists, or re-issue it with"
        " `jobworker certs renew-server --host NAME --ip ADDR`\n"
    )

"""Private job networks, through the real server: what a job reaches and what it cannot.

The "outside world" is a network namespace this module creates, behind a veth pair from
the host, on TEST-NET addresses: a server there answers on 198.51.100.x (the outside),
on 169.254.169.254 (routed there like a cloud's metadata service) and on 203.0.113.7 (a
network the server is told to deny). The host side of the veth is one of the host's own
addresses, made after the server started: it is covered because the host's addresses
are read for each job. Every probe prints every target's outcome, so a probe that stops
early fails the comparison. Traffic stays on loopback and in the namespace made here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import grpc
import pytest

from jobworker.api.pki import PkiPaths, init_pki
from jobworker.backends.local.isolation import IsolationPlan
from jobworker.hooks import hookimpl
from jobworker.hooks.host import Plugins
from jobworker.plugins.authz import Authz
from jobworker.plugins.isolation import Isolation
from jobworker.v1 import jobworker_pb2 as pb
from tests.serverfixtures import RPC_TIMEOUT_S, RunningServer, running_server, start_job

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates network namespaces: root")

WHITELIST = """
[[clients]]
identity = "alice"
role = "user"

[[clients]]
identity = "carol"
role = "user"
networks = ["host"]
"""
OUTSIDE_PORT = 8080
METADATA = "169.254.169.254"
DENIED = "203.0.113.7"
DENIED_NET = "203.0.113.0/24"

#: Connects to each "name=host:port" (or "name=@abstract unix socket") argument; prints
#: {name: what it read, or the errno}.
PROBE = """
import errno, json, socket, sys
seen = {}
for item in sys.argv[1:]:
    name, _, target = item.partition("=")
    host, _, port = target.rpartition(":")
    try:
        if target.startswith("@"):
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(3)
            conn.connect("\\0" + target[1:])
        else:
            conn = socket.create_connection((host, int(port)), timeout=3)
        with conn:
            seen[name] = conn.recv(64).decode().strip()
    except OSError as err:
        seen[name] = errno.errorcode.get(err.errno, str(err))
print(json.dumps(seen, sort_keys=True))
"""


@attrs.frozen
class Outside:
    """The namespace standing in for the world, and the host's own listening services."""

    namespace: str
    host_side: str  # the host's address on the veth
    outside: str  # the outside server's address
    loopback_port: int  # a service of the host's on 127.0.0.1
    host_port: int  # a service of the host's on its veth address
    abstract: str  # an abstract unix socket of the host's (they follow network namespaces)

    def targets(self) -> list[str]:
        return [
            f"outside={self.outside}:{OUTSIDE_PORT}",
            f"loopback=127.0.0.1:{self.loopback_port}",
            f"host_address={self.host_side}:{self.host_port}",
            f"metadata={METADATA}:{OUTSIDE_PORT}",
            f"denied={DENIED}:{OUTSIDE_PORT}",
            f"abstract=@{self.abstract}",
        ]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _serve(sock: socket.socket, answer: bytes) -> None:
    """Answer every connection with ``answer`` until the socket is closed."""
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.sendall(answer)


def _listen(address: str, answer: bytes) -> socket.socket:
    """A TCP service on ``address`` or, for "@NAME", on the abstract unix socket NAME."""
    if address.startswith("@"):
        sock = socket.socket(socket.AF_UNIX)
        sock.bind("\0" + address[1:])
        sock.listen()
    else:
        sock = socket.create_server((address, 0))
    threading.Thread(target=_serve, args=(sock, answer), daemon=True).start()
    return sock


@pytest.fixture(scope="module")
def outside() -> Iterator[Outside]:
    tag = os.getpid() % 60000
    namespace, host_if, out_if = f"jwt-out-{tag}", f"jwth{tag}", f"jwto{tag}"
    base = 4 * (os.getpid() % 60)  # a /30 of TEST-NET-2 of this run's own
    host_side, out_side = f"198.51.100.{base + 1}", f"198.51.100.{base + 2}"
    server = None
    listeners: list[socket.socket] = []
    try:
        _ip("netns", "add", namespace)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", out_if)
        _ip("link", "set", out_if, "netns", namespace)
        _ip("addr", "add", f"{host_side}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        inside = ("-n", namespace)
        _ip(*inside, "addr", "add", f"{out_side}/30", "dev", out_if)
        _ip(*inside, "link", "set", out_if, "up")
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "addr", "add", f"{METADATA}/32", "dev", "lo")
        _ip(*inside, "addr", "add", f"{DENIED}/32", "dev", "lo")
        _ip(*inside, "route", "add", "default", "via", host_side)
        for target in (METADATA, DENIED):
            _ip("route", "add", f"{target}/32", "via", out_side)
        code = (
            f"import socket; s = socket.create_server(('0.0.0.0', {OUTSIDE_PORT}))\n"
            "print('up', flush=True)\n"
            "while True:\n    c, a = s.accept(); c.sendall(b'outside-' + c.getsockname()[0]"
            ".encode() + b'\\n'); c.close()"
        )
        server = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None and server.stdout.readline() == "up\n"
        abstract = f"jobworker-test-{os.getpid()}"
        listeners = [
            _listen("127.0.0.1", b"host-loopback\n"),
            _listen(host_side, b"host-own\n"),
            _listen(f"@{abstract}", b"host-abstract\n"),
        ]
        yield Outside(
            namespace,
            host_side,
            out_side,
            listeners[0].getsockname()[1],
            listeners[1].getsockname()[1],
            abstract,
        )
    finally:
        for sock in listeners:
            sock.close()
        if server is not None:
            server.kill()
            server.communicate()
        for target in (METADATA, DENIED):
            subprocess.run(["ip", "route", "del", f"{target}/32"], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    paths = init_pki(
        tmp_path_factory.mktemp("net-pki"), clients=[("alice", "user"), ("carol", "user")]
    )
    paths.authz.write_text(WHITELIST)
    return paths


@pytest.fixture(scope="module")
def server(pki: PkiPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    plugins = Plugins()
    plugins.register(Authz.from_file(pki.authz), name="authz")
    isolation = Isolation()
    spool = tmp_path_factory.mktemp("net-spool")
    isolation.jobworker_configure(
        argparse.Namespace(spool_dir=spool, job_network_deny=[DENIED_NET], authz=pki.authz)
    )
    plugins.register(isolation, name="isolation")
    plugins.load([])
    with running_server(pki, plugins=plugins, spool_dir=spool) as running:
        yield running


def run_job(
    server: RunningServer, who: str, script: str, *args: str, **fields: object
) -> tuple[pb.JobStatusResponse, str]:
    stub = server.stub(who)
    job_id = start_job(stub, "sh", "-c", script, *args, **fields)
    out = b"".join(
        c.data
        for c in stub.StreamOutput(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        if c.stream == "stdout"
    )
    status = stub.GetStatus(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
    return status, out.decode(errors="replace")


def probe(server: RunningServer, who: str, outside: Outside, **fields: object) -> dict[str, str]:
    status, out = run_job(
        server, who, 'exec python3 -c "$0" "$@"', PROBE, *outside.targets(), **fields
    )
    assert status.exit_code == 0, (status, out)
    return dict(json.loads(out))


REFUSED = "EHOSTUNREACH"  # nftables' "reject with icmpx type admin-prohibited"


def test_a_private_job_reaches_the_outside_only(server: RunningServer, outside: Outside) -> None:
    seen = probe(server, "alice", outside)
    assert seen == {
        "outside": f"outside-{outside.outside}",
        "loopback": "ECONNREFUSED",  # its own loopback: nothing listens there
        "host_address": REFUSED,
        "metadata": REFUSED,
        "denied": REFUSED,
        "abstract": "ECONNREFUSED",  # the host's abstract sockets are another namespace's
    }
    status, _ = run_job(server, "alice", "true")
    assert status.isolation.endswith("network private")


def test_host_network_needs_a_grant(server: RunningServer, outside: Outside) -> None:
    with pytest.raises(grpc.RpcError) as info:
        start_job(server.stub("alice"), "true", network="host")
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "'alice' may not use the host's network" in info.value.details()
    # Granted, the same probe reaches everything: the refusals above are the rules' doing.
    seen = probe(server, "carol", outside, network="host")
    assert seen == {
        "outside": f"outside-{outside.outside}",
        "loopback": "host-loopback",
        "host_address": "host-own",
        "metadata": f"outside-{METADATA}",
        "denied": f"outside-{DENIED}",
        "abstract": "host-abstract",
    }


def test_network_none_reaches_nothing(server: RunningServer, outside: Outside) -> None:
    seen = probe(server, "carol", outside, network="none")
    assert seen["loopback"] == "ECONNREFUSED"
    assert {seen[k] for k in ("outside", "host_address", "metadata", "denied")} == {"ENETUNREACH"}


def test_rules_cannot_be_changed_by_the_job(server: RunningServer, outside: Outside) -> None:
    script = (
        "grep CapEff /proc/self/status; nft flush ruleset 2>/dev/null || echo nft-refused;"
        " ip route add 127.0.0.0/8 dev eth0 2>/dev/null || echo route-refused;"
        ' unshare -rn true 2>/dev/null && echo own-namespace-only; exec python3 -c "$0" "$@"'
    )
    _, out = run_job(server, "alice", script, PROBE, *outside.targets())
    lines = out.splitlines()
    assert lines[:3] == ["CapEff:\t0000000000000000", "nft-refused", "route-refused"], out
    seen = json.loads(lines[-1])
    assert (seen["host_address"], seen["metadata"]) == (REFUSED, REFUSED), out


def test_the_network_helper_ends_with_the_job(server: RunningServer) -> None:
    stub = server.stub("alice")
    job_id = start_job(stub, "sleep", "600")
    launcher = stub.GetStatus(pb.JobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S).pid
    helpers = [pid for pid in _children(launcher) if _comm(pid).startswith(("pasta", "passt"))]
    assert len(helpers) == 1, _children(launcher)
    stub.StopJob(pb.JobRequest(job_id=job_id, grace_seconds=1), timeout=RPC_TIMEOUT_S)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{helpers[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{helpers[0]}").exists()


def _children(pid: int) -> list[int]:
    text = "".join(p.read_text() for p in Path(f"/proc/{pid}/task").glob("*/children"))
    return [int(c) for c in text.split()]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# -- failure paths: nothing left behind ---------------------------------------------------


class OtherTool:
    """Points the plan's firewall or pasta at another program: one that fails, or a slow
    one."""

    def __init__(self, **tools: str) -> None:
        self.tools = tools

    @hookimpl
    def jobworker_isolate(self, plan: IsolationPlan | None) -> IsolationPlan | None:
        assert plan is not None and plan.private_network is not None
        broken = attrs.evolve(plan.private_network, **self.tools)
        return attrs.evolve(plan, private_network=broken)


BROKEN_SERVER = """
import asyncio, sys
from pathlib import Path
from jobworker.backends.local.manager import JobManager
from jobworker.backends.local.spawn import LAUNCHER, Spawner
from jobworker.errors import JobworkerError
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.plugins.isolation import Isolation
from tests.integration.test_network import OtherTool

async def main(spool, zygote, tool):
    before = launchers()  # another server's zygote, of the test process
    plugins = Plugins()
    plugins.register(Isolation(), "isolation")
    plugins.register(OtherTool(**{tool: "/bin/false"}), "broken")
    manager = JobManager(plugins, Path(spool))
    manager._spawner = Spawner(use_zygote=zygote == "zygote")
    try:
        await manager.start(JobSpec("true"), "alice")
    except JobworkerError as err:
        print(type(err).__name__, err)
    finally:
        await manager.shutdown()
    print("left", sorted(launchers() - before))

def launchers():
    # our launchers, zygotes and network helpers (forks of them) still alive
    return {
        p.name for p in Path("/proc").iterdir()
        if p.name.isdigit() and LAUNCHER.encode() in _read(p / "cmdline")
    }

def _read(path):
    try:
        return path.read_bytes()
    except OSError:
        return b""

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize("path", ["zygote", "launcher"])
@pytest.mark.parametrize(
    ("tool", "message"),
    [
        ("nft", "cannot set up the job's network namespace (nft): exit status 1"),
        ("pasta", "cannot set up the job's network namespace (pasta): exited"),
    ],
)
def test_a_failed_network_leaves_nothing(
    path: str, tool: str, message: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", BROKEN_SERVER, str(tmp_path), path, tool],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    lines = result.stdout.splitlines()
    assert lines[-2:] == [f"SpawnError {message}", "left []"], result


# -- probes through a JobManager of its own -------------------------------------------------

PROBE_SERVER = """
import asyncio, json, sys
from pathlib import Path
from jobworker.backends.local.manager import JobManager
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.plugins.isolation import Isolation
from jobworker.backends.local.network import parse_cidr
from tests.integration.test_network import PROBE, DENIED_NET, OtherTool

async def main(spool, user_namespace, pasta, *targets):
    plugins = Plugins()
    # As root, user_namespace forces what a server that is not root does on its own.
    deny = (parse_cidr(DENIED_NET),)
    isolation = Isolation(user_namespace=user_namespace == "yes", network_deny=deny)
    plugins.register(isolation, "isolation")
    if pasta:
        plugins.register(OtherTool(pasta=pasta), "pasta")
    manager = JobManager(plugins, Path(spool))
    try:
        job = await manager.start(JobSpec("python3", ("-c", PROBE, *targets)), "alice")
        out = b"".join([c.data async for c in manager.follow(job.job_id) if c.stream == 1])
        await manager.wait(job.job_id)
        print(job.isolation)
        sys.stdout.write(out.decode())
    finally:
        await manager.shutdown()

asyncio.run(main(*sys.argv[1:]))
"""


def probe_server(
    outside: Outside, spool: Path, *, user_namespace: bool = False, pasta: str = ""
) -> tuple[str, dict[str, str]]:
    """The isolation a job got, and what its probe saw."""
    yes = "yes" if user_namespace else "no"
    result = subprocess.run(
        [sys.executable, "-c", PROBE_SERVER, str(spool), yes, pasta, *outside.targets()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    lines = result.stdout.splitlines()[-2:]  # after the server's log lines
    assert len(lines) == 2, result
    try:
        return lines[0], json.loads(lines[1])
    except ValueError:
        raise AssertionError(result) from None


def test_a_server_that_is_not_root_gives_the_same_default(outside: Outside, tmp_path: Path) -> None:
    """The Quickstart as a normal user: its jobs get the same private network, through
    pasta in the job's user namespace. Run as root with the user namespace forced, as
    test_isolation does where nobody cannot execute this interpreter (CI, this host)."""
    isolation, seen = probe_server(outside, tmp_path, user_namespace=True)
    assert isolation == "user namespace, user root(0), network private"
    assert seen == {
        "outside": f"outside-{outside.outside}",
        "loopback": "ECONNREFUSED",
        "host_address": REFUSED,
        "metadata": REFUSED,
        "denied": REFUSED,
        "abstract": "ECONNREFUSED",  # the host's abstract sockets are another namespace's
    }


def test_the_command_runs_once_pasta_has_connected(outside: Outside, tmp_path: Path) -> None:
    """pasta starts beside the rest of the job's set-up and PID 1 waits for it before the
    command's process exists: with a pasta slower than all of that, the command's first
    connection still goes out (it would meet a namespace with no route, ENETUNREACH)."""
    real = shutil.which("pasta") or shutil.which("pasta", path="/usr/sbin:/usr/bin")
    slow = tmp_path / "slow-pasta"
    slow.write_text(f'#!/bin/sh\nsleep 1\nexec {real} "$@"\n')
    slow.chmod(0o755)
    spool = tmp_path / "spool"
    spool.mkdir()
    _, seen = probe_server(outside, spool, pasta=str(slow))
    assert seen["outside"] == f"outside-{outside.outside}"
    assert (seen["host_address"], seen["metadata"]) == (REFUSED, REFUSED)

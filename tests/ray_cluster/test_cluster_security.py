"""The cluster's control plane is authenticated, and jobs cannot reach it: Ray's ports turn
a job away, the token is nowhere a job can read, and a front refuses a cluster that does
not authenticate (tests/ray_cluster/conftest.py starts the cluster with token auth)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.ray_cluster.cluster import LocalCluster, local_cluster
from tests.ray_cluster.conftest import (
    GIB,
    Front,
    MakeServe,
    RayToken,
    ServeCommand,
    StartFront,
)
from tests.ray_cluster.test_cluster import agent_pid, status, stop
from tests.serverfixtures import output_of, start_job, wait_exited

#: One gRPC call per target, without a token: the status code each one answers.
#: From a job: the standard library only (the test's packages may live where a job's
#: account or its private /tmp cannot reach them). A TCP connection, or why not.
CONNECT_PROBE = r"""
import json, socket, sys
answers = {}
for name, (address, _method) in json.loads(sys.argv[1]).items():
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        answers[name] = "connected"
    except OSError as err:
        answers[name] = type(err).__name__
print(json.dumps(answers))
"""

PORT_PROBE = r"""
import grpc, json, sys
answers = {}
for name, (address, method) in json.loads(sys.argv[1]).items():
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method, lambda b: b, lambda b: b)
        try:
            call(b"", timeout=5)
            answers[name] = "OK"
        except grpc.RpcError as err:
            answers[name] = err.code().name
print(json.dumps(answers))
"""

#: Looks for ``needle`` in the environment, in every /proc/*/environ and cmdline it can
#: read (its own cmdline aside: the needle is there), in the files named, and in every
#: file below the directories named.
TOKEN_SEARCH = r"""
import errno, json, os, sys
needle = sys.argv[1].encode()
files, roots = json.loads(sys.argv[2]), json.loads(sys.argv[3])
found, outcomes, procs, read = [], {}, 0, 0
def look(where, data):
    if needle in data:
        found.append(where)
look("environ", "\0".join(f"{k}={v}" for k, v in os.environ.items()).encode())
for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{entry}/{name}", "rb") as f:
                    look(f"/proc/{entry}/{name}", f.read())
                procs += 1
            except OSError:
                pass
for path in files:
    try:
        with open(path, "rb") as f:
            data = f.read()
        look(path, data)
        outcomes[path] = f"read {len(data)} bytes"
    except OSError as err:
        outcomes[path] = errno.errorcode[err.errno]
for root in roots:
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            try:
                if os.path.isfile(path) and os.path.getsize(path) < 1 << 20:
                    with open(path, "rb") as f:
                        look(path, f.read())
                    read += 1
            except OSError:
                pass
print(json.dumps({"found": found, "procs": procs, "files": read, "outcomes": outcomes}))
"""

#: Where a token could be left on a node, besides the token file itself.
SEARCHED = ["/tmp", "/var/tmp", "/dev/shm", "/run", "/etc", "/root", "/home"]


#: The system's Python, running standard-library probes: the test's own interpreter and
#: packages may live where a job's account cannot reach (pyenv under /root, a clone in /tmp).
JOB_PYTHON = "/usr/bin/python3"


def _run_python(stub: pb_grpc.JobServiceStub, script: str, *args: str, **fields: str) -> str:
    job_id = start_job(stub, JOB_PYTHON, "-c", script, *args, node="w1", **fields)
    final = wait_exited(stub, job_id)
    out = output_of(stub, job_id)
    assert (final.reason, final.exit_code) == ("exited", 0), out
    return b"".join(data for stream, data in out if stream == "stdout").decode()


def _ray_ports(cluster: LocalCluster) -> dict[str, tuple[str, str]]:
    host = cluster.address.split(":")[0]
    return {
        "gcs": (cluster.address, "/ray.rpc.NodeInfoGcsService/GetClusterId"),
        "client": (f"{host}:{cluster.client_port}", "/ray.rpc.RayletDriver/ClusterInfo"),
        "raylet": (f"{host}:{cluster.raylet_ports['w1']}", "/ray.rpc.NodeManagerService/GetNodeStats"),
        "head raylet": (f"{host}:{cluster.raylet_ports['head']}", "/ray.rpc.NodeManagerService/GetNodeStats"),
    }  # fmt: skip


def test_every_ray_port_turns_a_job_away(front: Front, ray_cluster: LocalCluster) -> None:
    targets = json.dumps(_ray_ports(ray_cluster))
    alice = front.stub("alice")
    # Without a token, from this host: every port answers, and refuses.
    here = subprocess.run(
        [sys.executable, "-c", PORT_PROBE, targets], capture_output=True, check=True, timeout=60
    )
    assert set(json.loads(here.stdout).values()) == {"UNAUTHENTICATED"}
    # The job's probe, run here: it connects to every port (so its refusals below are the
    # job's network, not a probe that cannot connect).
    here = subprocess.run(
        [JOB_PYTHON, "-I", "-c", CONNECT_PROBE, targets],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert set(json.loads(here.stdout).values()) == {"connected"}
    # From a job on a node, on the default (private) network: the node's addresses and
    # the cluster's are denied, so no connection at all.
    default = json.loads(_run_python(alice, CONNECT_PROBE, targets))
    assert default.keys() == json.loads(targets).keys()
    assert "connected" not in default.values(), default
    # With --network none: no connection at all.
    none = json.loads(_run_python(alice, CONNECT_PROBE, targets, network="none"))
    assert "connected" not in none.values(), none


def test_the_token_is_nowhere_a_job_can_read(front: Front, ray_token: RayToken) -> None:
    alice = front.stub("alice")
    needle = ray_token.value[:32]  # half the token: finding it means finding the token
    # The search finds the token where it can read it: here, in its file and environment.
    control = subprocess.run(
        [sys.executable, "-c", TOKEN_SEARCH, needle, json.dumps([str(ray_token.path)]), "[]"],
        capture_output=True, check=True, timeout=60,
        env={**os.environ, "LEAKED": ray_token.value},
    )  # fmt: skip
    assert set(json.loads(control.stdout)["found"]) == {"environ", str(ray_token.path)}

    holder = start_job(alice, "sleep", "60", node="w1")
    try:
        agent = agent_pid(status(alice, holder).pid)
        # The agent and the raylet have the token file's path in their environment.
        assert b"RAY_AUTH_TOKEN_PATH" in Path(f"/proc/{agent}/environ").read_bytes()
        files = [str(ray_token.path), f"/proc/{agent}/environ", f"/proc/{agent}/cmdline"]
        roots = [str(ray_token.path.parent), *SEARCHED]
        search = (needle, json.dumps(files), json.dumps(roots))
        seen = json.loads(_run_python(alice, TOKEN_SEARCH, *search))
    finally:
        stop(alice, holder)
    assert seen["found"] == [], seen
    assert seen["procs"] >= 1 and seen["files"] >= 50, seen  # it did look
    # The token file is covered (an empty file in its place), the agent's /proc invisible.
    assert seen["outcomes"][str(ray_token.path)] in ("read 0 bytes", "ENOENT", "EACCES"), seen


@pytest.fixture(scope="module")
def open_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A one-node cluster without authentication (Ray's default before 2.52)."""
    log_path = tmp_path_factory.mktemp("open-ray") / "cluster.log"
    nodes = [{"name": "solo", "num_cpus": 1, "memory": GIB}]
    with local_cluster(nodes, log_path, env={"RAY_AUTH_MODE": "disabled"}) as cluster:
        yield cluster


def _refusal(command: ServeCommand) -> str:
    """The one line ``jobworker serve`` exits with."""
    ran = subprocess.run(
        command.argv, env=command.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120
    )
    assert ran.returncode != 0
    stderr = ran.stderr.decode()
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def test_a_front_refuses_a_cluster_without_auth_unless_told_so(
    open_cluster: LocalCluster, serve_command: MakeServe, start_front: StartFront
) -> None:
    refused = _refusal(serve_command(ray_address=open_cluster.address, ray_env={}))
    assert "does not authenticate" in refused
    assert "RAY_AUTH_MODE=token" in refused and "--ray-allow-unauthenticated" in refused
    # A front without the token of a cluster that wants one is told what it lacks.
    untokened = _refusal(serve_command(ray_env={}))
    assert "requires its token" in untokened and "RAY_AUTH_TOKEN_PATH" in untokened

    front = start_front("--ray-allow-unauthenticated", ray_address=open_cluster.address, ray_env={})
    try:
        alice = front.stub("alice")
        job_id = start_job(alice, "true")
        assert wait_exited(alice, job_id).node == "solo"
        warned = [
            json.loads(line) for line in front.log().splitlines() if "unauthenticated" in line
        ]
        assert any(
            w["event"] == "ray_cluster_unauthenticated" and "job_id" not in w for w in warned
        )
        assert any(w.get("job_id") == job_id for w in warned)
    finally:
        front.terminate()

"""Several front servers on one cluster (docs/cluster.md, "Many front servers"): a job is
served by every front, its end recorded once, SIGTERM of a front stops nothing, the
per-client quota holds across fronts (racing starts included, and across a restart of the
ledger's actor), and a client given every front's address goes on when one is killed or
stopped (`logs -f` and `run`, from their offset)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from jobworker.api.pki import PkiPaths
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc
from tests.ray_cluster.cluster import LocalCluster
from tests.ray_cluster.conftest import JOBWORKER, Front, MakeServe, StartFront
from tests.ray_cluster.test_cluster import alive, cli_at, cli_env, status, stop, wait_for
from tests.serverfixtures import output_of, start_job, wait_exited

LINES = 50_000


def seq(n: int) -> bytes:
    """The output of ``seq N``."""
    return b"".join(b"%d\n" % i for i in range(1, n + 1))


def ids(stub: pb_grpc.JobServiceStub) -> set[str]:
    return {job.job_id for job in stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs}


def stdout_of(stub: pb_grpc.JobServiceStub, job_id: str, follow: bool) -> bytes:
    chunks = output_of(stub, job_id, no_follow=not follow)
    return b"".join(data for stream, data in chunks if stream == "stdout")


def exit_records(fronts: list[Front], job_id: str) -> list[dict[str, object]]:
    return [
        record
        for front in fronts
        for record in front.audit()
        if record["audit"] == "job_exited" and record["job_id"] == job_id
    ]


@pytest.fixture(scope="module")
def pair(start_front: StartFront) -> tuple[Front, Front]:
    """Two front servers on the session's cluster."""
    return start_front(), start_front()


def test_a_job_started_through_one_front_is_listed_followed_fed_and_stopped_through_another(
    pair: tuple[Front, Front], started_fronts: list[Front]
) -> None:
    a, b = pair
    through_a, through_b = a.stub("alice"), b.stub("alice")
    job_id = start_job(through_a, "sh", "-c", f"seq {LINES}; exec cat", stdin=True, node="w1")
    # B learns it from its node's poll, which answers at once on a start.
    wait_for(lambda: job_id in ids(through_b), 10, "the job listed through the other front")
    seen = status(through_b, job_id)
    assert (seen.status, seen.owner, seen.node) == ("running", "alice", "w1")
    with pytest.raises(grpc.RpcError) as hidden:  # the owner check holds there too
        status(b.stub("bob"), job_id)
    assert hidden.value.code() is grpc.StatusCode.NOT_FOUND
    fed = through_b.WriteInput(iter([pb.InputChunk(job_id=job_id, data=b"from b\n")]), timeout=30)
    assert (fed.bytes_written, fed.closed) == (7, False)
    wanted = seq(LINES) + b"from b\n"
    wait_for(lambda: stdout_of(through_b, job_id, follow=False) == wanted, 10, "the fed line")
    assert stop(through_b, job_id).status.reason == "stopped"
    ended = status(through_a, job_id)
    assert (ended.status, ended.reason) == ("exited", "stopped")
    # Followed through B to its end: byte-exact.
    assert stdout_of(through_b, job_id, follow=True) == wanted
    # Its start is recorded by the front that started it, its end by one front only (of
    # every front on the cluster: other tests' may be running too).
    wait_for(lambda: exit_records(started_fronts, job_id), 10, "the job_exited record")
    time.sleep(2)  # the other fronts saw the end too: long enough for a second record
    assert len(exit_records(started_fronts, job_id)) == 1
    started = [
        r["job_id"] for f in started_fronts for r in f.audit() if r["audit"] == "job_started"
    ]
    assert started.count(job_id) == 1
    assert job_id in {r["job_id"] for r in a.audit() if r["audit"] == "job_started"}


@pytest.fixture(scope="module")
def quota_pair(start_front: StartFront) -> Iterator[tuple[Front, Front]]:
    """Two fronts allowing each client one job; bob's jobs are stopped after each test."""
    fronts = start_front("--max-jobs-per-client", "1"), start_front("--max-jobs-per-client", "1")
    yield fronts
    bob = fronts[1].stub("bob")
    for job_id in ids(bob):
        if status(bob, job_id).status == "running":
            stop(bob, job_id)


def start_outcome(stub: pb_grpc.JobServiceStub, *command: str) -> tuple[str, str]:
    """(status code name, job id or the error's details) of one start."""
    try:
        return "OK", start_job(stub, *command, node="w1")
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""


def start_when_free(stub: pb_grpc.JobServiceStub, *command: str) -> str:
    """Start once the client's slot is back (its last job's end reported): within 10 s."""
    deadline = time.monotonic() + 10
    while True:
        code, found = start_outcome(stub, *command)
        if code == "OK":
            return found
        assert code == "RESOURCE_EXHAUSTED" and time.monotonic() < deadline, found
        time.sleep(0.1)


def race(stubs: list[pb_grpc.JobServiceStub], *command: str) -> list[tuple[str, str]]:
    """Start ``command`` through every stub at the same moment; each one's outcome."""
    barrier = threading.Barrier(len(stubs))
    outcomes = [("", "")] * len(stubs)

    def start(i: int) -> None:
        barrier.wait()
        outcomes[i] = start_outcome(stubs[i], *command)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(stubs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_a_client_quota_of_one_holds_across_fronts(quota_pair: tuple[Front, Front]) -> None:
    a, b = quota_pair
    bob_a, bob_b = a.stub("bob"), b.stub("bob")
    first = start_when_free(bob_a, "sleep", "300")
    code, details = start_outcome(bob_b, "true")
    assert code == "RESOURCE_EXHAUSTED"
    assert "bob has 1 jobs starting or running" in details
    assert "--max-jobs-per-client 1" in details
    stop(bob_a, first)
    # Allowed again through the other front once the first has ended.
    assert wait_exited(bob_b, start_when_free(bob_b, "true")).exit_code == 0


def test_two_starts_racing_through_both_fronts_for_the_last_slot_one_wins(
    quota_pair: tuple[Front, Front],
) -> None:
    stubs = [front.stub("bob") for front in quota_pair]
    for _ in range(5):
        deadline = time.monotonic() + 10
        while True:  # a round where the slot was free when both asked
            outcomes = race(stubs, "sleep", "300")
            winners = [(i, found) for i, (code, found) in enumerate(outcomes) if code == "OK"]
            assert len(winners) <= 1, outcomes  # never both
            if winners or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the last round's end was not reported yet: both refused
        assert len(winners) == 1, outcomes
        assert sorted(code for code, _ in outcomes) == ["OK", "RESOURCE_EXHAUSTED"]
        (i, job_id) = winners[0]
        stop(stubs[i], job_id)


#: A driver of its own, with the cluster's token as a front has: the ledger's counts, then
#: its actor's process SIGKILLed, then its counts once Ray restarted it (the call fails
#: until then).
_LEDGER_KILLER = """
import json, os, signal, sys, time
import ray
from jobworker.backends.ray.agent import NAMESPACE
from jobworker.backends.ray.ledger import LEDGER_NAME
ray.init(address=sys.argv[1], namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
ledger = ray.get_actor(LEDGER_NAME, namespace=NAMESPACE)
before = ray.get(ledger.counts.remote(), timeout=30)
pid = ray.get(ledger.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
os.kill(pid, signal.SIGKILL)
deadline = time.monotonic() + 60
while True:
    try:
        after = ray.get(ledger.counts.remote(), timeout=30)
        break
    except ray.exceptions.RayActorError:
        assert time.monotonic() < deadline, "the ledger was not restarted"
        time.sleep(0.2)
again = ray.get(ledger.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
print(json.dumps({"before": before, "after": after, "pids": [pid, again]}))
"""


def test_the_quota_holds_after_the_ledger_restarts_empty(
    quota_pair: tuple[Front, Front], ray_cluster: LocalCluster, serve_command: MakeServe
) -> None:
    a, b = quota_pair
    bob_a, bob_b = a.stub("bob"), b.stub("bob")
    first = start_when_free(bob_a, "sleep", "300")
    wait_for(lambda: first in ids(bob_b), 10, "the job known to the other front")
    lessons = [front.log().count('"ray_ledger_taught"') for front in quota_pair]
    restarted = subprocess.run(
        [sys.executable, "-c", _LEDGER_KILLER, ray_cluster.address],
        env=serve_command().env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr
    counts = json.loads(restarted.stdout)
    assert counts["before"].get("bob") == 1
    pid, again = counts["pids"]
    assert again != pid and "bob" not in counts["after"]  # Ray restarted it, empty
    # Through either front, bob's next start is refused as before (UNAVAILABLE while the
    # actor restarts, at most), never allowed: the front taught the new ledger first.
    for stub in (bob_b, bob_a):
        deadline = time.monotonic() + 30
        while (outcome := start_outcome(stub, "true"))[0] != "RESOURCE_EXHAUSTED":
            assert outcome[0] == "UNAVAILABLE" and time.monotonic() < deadline, outcome
            time.sleep(0.2)
        assert "bob has 1 jobs starting or running" in outcome[1]
    # Each front taught the new ledger once more (its running jobs: bob's among them).
    assert [front.log().count('"ray_ledger_taught"') for front in quota_pair] == [
        n + 1 for n in lessons
    ]
    stop(bob_a, first)
    # Its end reaches the new ledger: allowed again, through the other front.
    assert wait_exited(bob_b, start_when_free(bob_b, "true")).exit_code == 0


@pytest.mark.parametrize("direct", ["--ray-direct-output", "--no-ray-direct-output"])
def test_a_client_given_both_fronts_keeps_working_when_one_is_killed(
    start_front: StartFront, ray_pki: PkiPaths, direct: str
) -> None:
    """Relayed, the follower resumes through the other front; reading from the node
    itself (direct output), it does not even notice."""
    a, b = start_front(direct), start_front(direct)
    both = f"{a.address},{b.address}"
    cli = cli_at(both, ray_pki)
    started = cli("start", "--node", "w2", "--", "sh", "-c", "seq 20000; sleep 4; seq 20000")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.decode().strip()
    follower = subprocess.Popen(
        [JOBWORKER, "logs", "-f", job_id], env=cli_env(both, ray_pki),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        head = os.read(follower.stdout.fileno(), 1 << 16)  # following through a
        assert head.startswith(b"1\n")
        a.kill()
        out, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
    # The follower went on through b from its offset: every byte, once.
    assert follower.returncode == 0, err
    assert head + out == seq(20000) * 2
    assert (b"resuming at offset" in err) is (direct == "--no-ray-direct-output"), err
    # New commands go to b.
    shown = cli("status", job_id)
    assert shown.returncode == 0 and b"exited" in shown.stdout, shown.stderr
    ran = cli("run", "--node", "w1", "--", "echo", "through b")
    assert (ran.returncode, ran.stdout) == (0, b"through b\n"), ran.stderr


@pytest.fixture(scope="module")
def standby(start_front: StartFront) -> Front:
    """A front that stays up while the one a client uses goes."""
    return start_front()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("direct", ["--no-ray-direct-output", "--ray-direct-output"])
def test_run_given_both_fronts_goes_on_from_its_offset_when_its_front_goes(
    start_front: StartFront, standby: Front, ray_pki: PkiPaths, signum: int, direct: str
) -> None:
    """Relayed, ``run`` resumes its output through the standby; reading from the node
    itself (direct output) it asks the standby for the job's end."""
    used = start_front(direct)  # first in the list: pick_first keeps to it while it answers
    both = f"{used.address},{standby.address}"
    script = "seq 20000; sleep 4; seq 20001 40000; echo done >&2; exit 7"
    runner = subprocess.Popen(
        [JOBWORKER, "run", "--node", "w2", "--", "sh", "-c", script],
        env=cli_env(both, ray_pki), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert runner.stdout is not None
        head = os.read(runner.stdout.fileno(), 1 << 16)  # mid-stream
        assert head.startswith(b"1\n")
        if signum == signal.SIGKILL:
            used.kill()
        else:
            used.terminate()  # its followers get UNAVAILABLE; its jobs go on
        out, err = runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
    # Every byte once, the job's own exit status, and what happened said on stderr.
    assert head + out == seq(40000)
    assert runner.returncode == 7, err
    assert err.endswith(b"done\n")
    if direct == "--no-ray-direct-output":
        assert b"the server went away; resuming at offset " in err
        assert b"resumed at offset " in err


def test_sigterm_of_one_front_leaves_every_job_running_and_the_other_serves_them(
    pair: tuple[Front, Front],
) -> None:
    a, b = pair  # the last test of the module: a goes
    through_a, through_b = a.stub("alice"), b.stub("alice")
    its_own = start_job(through_a, "sleep", "300", node="w2")
    others = start_job(through_b, "sleep", "300", node="w1")
    wait_for(lambda: its_own in ids(through_b), 10, "a's job known to b")
    wait_for(lambda: others in ids(through_a), 10, "b's job known to a")
    pids = [status(through_b, j).pid for j in (its_own, others)]
    a.terminate()
    assert a.process.returncode == 0
    assert '"ray_jobs_left_running"' in a.log() and '"server_stopped"' in a.log()
    for job_id, pid in zip((its_own, others), pids, strict=True):
        assert status(through_b, job_id).status == "running"
        assert alive(pid)
        assert stop(through_b, job_id).status.reason == "stopped"

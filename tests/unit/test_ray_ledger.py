"""The cluster's ledger of running jobs (jobworker/backends/ray/ledger.py), as every front
server's calls reach it: quotas over all fronts, each end handled by its first reporter,
jobs found on nodes counted, reservations of dead starts lapsing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from jobworker.backends.ray.ledger import Ledger

_T = TypeVar("_T")
LONG = 60.0


def run(step: Awaitable[_T]) -> _T:
    async def once() -> _T:
        return await step

    return asyncio.run(once())


def test_the_per_client_quota_counts_every_front_and_the_last_slot_goes_once() -> None:
    ledger = Ledger()
    assert run(ledger.reserve("a1", "alice", 10, 2, LONG)) is None  # through front A
    assert run(ledger.reserve("a2", "alice", 10, 2, LONG)) is None  # through front B
    assert run(ledger.reserve("a3", "alice", 10, 2, LONG)) == (2, 2)
    assert run(ledger.reserve("b1", "bob", 10, 2, LONG)) is None  # another client's own
    run(ledger.release("a2"))  # a start that failed gives its slot back
    assert run(ledger.reserve("a3", "alice", 10, 2, LONG)) is None
    assert run(ledger.counts()) == {"alice": 2, "bob": 1}


def test_the_cluster_limit_counts_every_client() -> None:
    ledger = Ledger()
    for n in range(3):
        assert run(ledger.reserve(f"j{n}", f"client{n}", 3, 3, LONG)) is None
    assert run(ledger.reserve("j3", "client3", 3, 3, LONG)) == (3, 0)


def test_only_the_first_report_of_an_end_is_first_and_frees_the_slot() -> None:
    ledger = Ledger()
    assert run(ledger.reserve("a1", "alice", 10, 1, LONG)) is None
    run(ledger.hold("a1", "n1"))
    assert run(ledger.end("a1")) is True  # front A writes the record
    assert run(ledger.end("a1")) is False  # front B, a moment later, does not
    assert run(ledger.counts()) == {}
    # A hold arriving after the end (its front was slow) takes nothing back.
    run(ledger.hold("a1", "n1"))
    assert run(ledger.reserve("a2", "alice", 10, 1, LONG)) is None


def test_a_pending_reservation_lapses_once_a_held_one_does_not() -> None:
    ledger = Ledger()
    assert run(ledger.reserve("dead", "alice", 10, 2, 0.0)) is None  # its front died
    assert run(ledger.reserve("held", "alice", 10, 2, 0.0)) is None
    run(ledger.hold("held", "n1"))
    # The next reservation drops the lapsed pending one, not the held one.
    assert run(ledger.reserve("next", "alice", 10, 2, LONG)) is None
    assert run(ledger.reserve("over", "alice", 10, 2, LONG)) == (2, 2)


def test_found_jobs_are_counted_and_unreported_ends_are_handed_back_once() -> None:
    ledger = Ledger()
    assert run(ledger.reserve("ended", "alice", 10, 5, LONG)) is None
    assert run(ledger.reserve("reported", "alice", 10, 5, LONG)) is None
    assert run(ledger.end("reported")) is True
    # A new front finds an unknown running job of bob's and two ended ones.
    found = run(ledger.adopt("n1", {"old": "bob"}, ["ended", "reported", "unknown"]))
    assert found == ["ended"]  # its end was never reported: the finder records it
    assert run(ledger.end("ended")) is False  # the slow watcher does not record it again
    assert run(ledger.counts()) == {"bob": 1}
    # Finding it again counts it once; a job already ended is not taken in.
    assert run(ledger.adopt("n1", {"old": "bob", "reported": "alice"}, [])) == []
    assert run(ledger.counts()) == {"bob": 1}


def test_the_jobs_of_a_node_declared_dead_give_their_slots_back() -> None:
    dead: set[str] = set()
    ledger = Ledger(dead=lambda: dead)
    for job_id, node in (("lost", "n1"), ("kept", "n2")):
        assert run(ledger.reserve(job_id, "alice", 10, 5, LONG)) is None
        run(ledger.hold(job_id, node))
    run(ledger.adopt("n1", {"found": "bob"}, []))
    assert run(ledger.sweep()) == []  # every node alive (or joined since: not dead)
    dead.add("n1")
    assert sorted(run(ledger.sweep())) == ["found", "lost"]
    assert run(ledger.counts()) == {"alice": 1}
    # A front that saw the loss still records it, once.
    assert (run(ledger.end("lost")), run(ledger.end("lost"))) == (True, False)

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


def reserve(
    ledger: Ledger, job_id: str, owner: str, total: int, per_client: int, expires: float = LONG
) -> tuple[int, int] | str | None:
    """A reservation by a front that taught this ledger (:meth:`Ledger.teach`)."""
    return run(ledger.reserve(job_id, owner, total, per_client, expires, ledger.epoch))


def test_the_per_client_quota_counts_every_front_and_the_last_slot_goes_once() -> None:
    ledger = Ledger()
    assert reserve(ledger, "a1", "alice", 10, 2) is None  # through front A
    assert reserve(ledger, "a2", "alice", 10, 2) is None  # through front B
    assert reserve(ledger, "a3", "alice", 10, 2) == (2, 2)
    assert reserve(ledger, "b1", "bob", 10, 2) is None  # another client's own
    run(ledger.release("a2"))  # a start that failed gives its slot back
    assert reserve(ledger, "a3", "alice", 10, 2) is None
    assert run(ledger.counts()) == {"alice": 2, "bob": 1}


def test_the_cluster_limit_counts_every_client() -> None:
    ledger = Ledger()
    for n in range(3):
        assert reserve(ledger, f"j{n}", f"client{n}", 3, 3) is None
    assert reserve(ledger, "j3", "client3", 3, 3) == (3, 0)


def test_only_the_first_report_of_an_end_is_first_and_frees_the_slot() -> None:
    ledger = Ledger()
    assert reserve(ledger, "a1", "alice", 10, 1) is None
    run(ledger.hold("a1", "alice", "n1"))
    assert run(ledger.end("a1")) is True  # front A writes the record
    assert run(ledger.end("a1")) is False  # front B, a moment later, does not
    assert run(ledger.counts()) == {}
    # A hold arriving after the end (its front was slow) takes nothing back.
    run(ledger.hold("a1", "alice", "n1"))
    assert reserve(ledger, "a2", "alice", 10, 1) is None


def test_a_pending_reservation_lapses_once_a_held_one_does_not() -> None:
    ledger = Ledger()
    assert reserve(ledger, "dead", "alice", 10, 2, 0.0) is None  # its front died
    assert reserve(ledger, "held", "alice", 10, 2, 0.0) is None
    run(ledger.hold("held", "alice", "n1"))
    # The next reservation drops the lapsed pending one, not the held one.
    assert reserve(ledger, "next", "alice", 10, 2) is None
    assert reserve(ledger, "over", "alice", 10, 2) == (2, 2)


def test_found_jobs_are_counted_and_unreported_ends_are_handed_back_once() -> None:
    ledger = Ledger()
    assert reserve(ledger, "ended", "alice", 10, 5) is None
    assert reserve(ledger, "reported", "alice", 10, 5) is None
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
        assert reserve(ledger, job_id, "alice", 10, 5) is None
        run(ledger.hold(job_id, "alice", node))
    run(ledger.adopt("n1", {"found": "bob"}, []))
    assert run(ledger.sweep()) == []  # every node alive (or joined since: not dead)
    dead.add("n1")
    assert sorted(run(ledger.sweep())) == ["found", "lost"]
    assert run(ledger.counts()) == {"alice": 1}
    # A front that saw the loss still records it, once.
    assert (run(ledger.end("lost")), run(ledger.end("lost"))) == (True, False)


def test_a_restarted_ledger_decides_nothing_until_taught_and_then_counts_what_it_was_taught() -> (
    None
):
    before = Ledger()
    assert reserve(before, "a1", "alice", 10, 1) is None
    taught_before = before.epoch
    # Ray restarts the actor: a new instance, empty, of another epoch.
    after = Ledger()
    assert after.epoch != taught_before
    assert run(after.reserve("a2", "alice", 10, 1, LONG, taught_before)) == "untaught"
    assert run(after.reserve("a2", "alice", 10, 1, LONG, None)) == "untaught"  # a new front
    assert run(after.counts()) == {}  # nothing reserved meanwhile
    # Two fronts teach it the running jobs they know (the same one, twice: one hold).
    lesson = {"a1": ("alice", "n1"), "b1": ("bob", "n2")}
    assert run(after.teach(lesson)) == after.epoch
    assert run(after.teach({"a1": ("alice", "n1")})) == after.epoch
    assert run(after.counts()) == {"alice": 1, "bob": 1}
    assert reserve(after, "a2", "alice", 10, 1) == (2, 1)
    # Held, not pending: a lesson does not lapse; an end reported gives the slot back.
    assert reserve(after, "b2", "bob", 10, 2, 0.0) is None  # pending: lapses at once
    assert reserve(after, "b3", "bob", 10, 2) is None  # b2 lapsed, the taught b1 did not
    assert reserve(after, "b4", "bob", 10, 2) == (3, 2)
    assert run(after.end("a1")) is True
    assert reserve(after, "a2", "alice", 10, 1) is None


def test_a_start_in_flight_across_a_restart_is_taken_in_by_its_hold_and_an_ended_job_is_not() -> (
    None
):
    ledger = Ledger()  # reserved "a1" in the ledger before this one; its end reached us
    assert run(ledger.end("gone")) is True
    run(ledger.hold("a1", "alice", "n1"))
    run(ledger.teach({"gone": ("alice", "n1")}))  # a front's table a moment behind
    assert run(ledger.counts()) == {"alice": 1}
    assert reserve(ledger, "a2", "alice", 10, 1) == (1, 1)

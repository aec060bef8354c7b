"""When an idle node's heartbeat comes (:func:`.discovery.heartbeat_wait`): always within
the suspect deadline, and together with the other nodes of its batch."""

from __future__ import annotations

import collections
import itertools
import random

from jobworker.backends.ray.discovery import (
    HEARTBEAT_BATCH,
    POLL_MIN_SECONDS,
    POLL_SECONDS,
    heartbeat_wait,
)
from jobworker.backends.ray.nodes import HEARTBEAT_DEADLINE


def _node_ids(count: int, seed: int = 26) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(224):056x}" for _ in range(count)]


def test_every_poll_waits_at_least_the_minimum_and_answers_before_the_deadline() -> None:
    rng = random.Random(1)
    for node_id in _node_ids(200):
        for nodes in (1, 32, 1000):
            now = rng.uniform(0, 10_000)
            wait = heartbeat_wait(node_id, nodes, now)
            assert POLL_MIN_SECONDS <= wait < POLL_SECONDS + POLL_MIN_SECONDS
    assert POLL_SECONDS + POLL_MIN_SECONDS < HEARTBEAT_DEADLINE


def test_polls_made_at_different_times_end_together_in_a_small_cluster() -> None:
    rng = random.Random(2)
    nodes = _node_ids(HEARTBEAT_BATCH)
    ends = set()
    period = 67 * POLL_SECONDS  # a heartbeat time of a one-batch cluster
    for node_id in nodes:
        now = period + rng.uniform(0, POLL_SECONDS - POLL_MIN_SECONDS)  # polls over one period
        ends.add(round(now + heartbeat_wait(node_id, len(nodes), now), 6))
    assert ends == {period + POLL_SECONDS}


def test_a_large_cluster_spreads_its_heartbeats_over_batches_of_about_the_batch_size() -> None:
    nodes = _node_ids(1000)
    now = 5000.0
    batches = collections.Counter(round(now + heartbeat_wait(n, len(nodes), now), 6) for n in nodes)
    assert len(batches) == -(-len(nodes) // HEARTBEAT_BATCH)
    assert max(batches.values()) <= 2 * HEARTBEAT_BATCH, batches
    times = sorted(batches)
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(times)}
    assert gaps == {round(POLL_SECONDS / len(batches), 6)}, gaps

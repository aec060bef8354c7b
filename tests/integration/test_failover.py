"""A client given several server addresses (a cluster's front servers): one server is used
until it goes down, then the next, with the servers' certificates still checked by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobworker.api.address import dial_target
from jobworker.api.pki import PkiPaths
from jobworker.client import JobClient
from jobworker.errors import Unavailable
from tests.serverfixtures import make_api_pki, running_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return make_api_pki(tmp_path / "pki")


def test_the_next_server_answers_once_the_first_is_down(pki: PkiPaths) -> None:
    with running_server(pki) as second, running_server(pki) as first:
        on_first = JobClient(first.address, pki.client("alice")).start("sleep", ["60"])
        target, name = dial_target(f"{first.address},{second.address}")
        assert (target, name) == (f"ipv4:{first.address},{second.address}", "127.0.0.1")
        with JobClient(target, pki.client("alice"), server_name=name) as both:
            # The first address is used while it answers: its job is listed.
            assert [j.job_id for j in both.list()] == [on_first]
            first.stop()
            # The same channel goes on with the second server (which has no job).
            assert both.list() == []
            job_id = both.start("true")
            assert both.status(job_id).job_id == job_id


def test_the_certificate_must_list_the_name_given_for_several_servers(pki: PkiPaths) -> None:
    with running_server(pki) as first, running_server(pki) as second:
        target, _ = dial_target(f"{first.address},{second.address}")
        wrong = JobClient(target, pki.client("alice"), server_name="other.example")
        with wrong, pytest.raises(Unavailable, match=r"does not name the host dialled \(other"):
            wrong.list()
        # grpc's default name for such a target is no host: the name must be given.
        with JobClient(target, pki.client("alice")) as unnamed, pytest.raises(Unavailable):
            unnamed.list()

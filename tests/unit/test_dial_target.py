"""``--server`` as a gRPC target (jobworker/api/address.py ``dial_target``): one address, a
list of front servers' IP addresses, or a gRPC target, and the name to verify."""

from __future__ import annotations

import re

import pytest

from jobworker.api.address import dial_target
from jobworker.errors import UsageError


def test_one_address_is_dialled_as_before() -> None:
    assert dial_target("jobs.example") == ("jobs.example:50051", None)
    assert dial_target("10.0.0.5:7000", "jobs.example") == ("10.0.0.5:7000", "jobs.example")


def test_a_list_of_addresses_becomes_grpcs_address_list_with_its_common_host() -> None:
    assert dial_target("127.0.0.1:5001, 127.0.0.1") == (
        "ipv4:127.0.0.1:5001,127.0.0.1:50051",
        "127.0.0.1",
    )
    assert dial_target("[::1]:5001,::1") == ("ipv6:[::1]:5001,[::1]:50051", "::1")
    assert dial_target("10.0.0.1,10.0.0.2", "fronts.example") == (
        "ipv4:10.0.0.1:50051,10.0.0.2:50051",
        "fronts.example",
    )


def test_grpc_targets_pass_as_they_are() -> None:
    assert dial_target("dns:///fronts.example:50051") == ("dns:///fronts.example:50051", None)
    assert dial_target("ipv4:10.0.0.1:1,10.0.0.1:2") == ("ipv4:10.0.0.1:1,10.0.0.1:2", "10.0.0.1")


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        ("10.0.0.1,10.0.0.2", "several hosts need --server-name NAME"),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", "several hosts need --server-name NAME"),
        ("a.example,b.example", "must be IP addresses (a.example:50051 is not"),
        ("10.0.0.1,::1", "not both"),
    ],
)
def test_lists_that_cannot_be_dialled_or_verified_are_refused(servers: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        dial_target(servers)

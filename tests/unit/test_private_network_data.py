"""The private network's data: the host's addresses, the deny list, its rules, the grant."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from jobworker.backends.local.isolation import Account, IsolationPlan
from jobworker.backends.local.network import (
    ALWAYS_DENIED,
    PrivateNetwork,
    deny_list,
    host_addresses,
    parse_cidr,
    ruleset,
)
from jobworker.errors import ConfigError, PermissionDenied
from jobworker.jobspec import JobSpec, Network
from jobworker.plugins.authz import Authz
from jobworker.plugins.isolation import Isolation

# As /proc/net shows them: the host is 127.0.0.1 and 192.0.2.2, and fd00::2 and a link-local.
FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 192.0.2.0/24 2 0 2
        |-- 192.0.2.0
           /24 link UNICAST
        |-- 192.0.2.2
           /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
"""
IF_INET6 = """fd000000000000000000000000000002 02 40 00 80     eth0
fe8000000000000000fc00fffe000001 02 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def test_the_host_addresses_are_read_from_proc_net(tmp_path: Path) -> None:
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "if_inet6").write_text(IF_INET6)
    assert host_addresses(tmp_path) == [
        net("127.0.0.1/32"),
        net("192.0.2.2/32"),
        net("fd00::2/128"),
        net("fe80::fc:ff:fe00:1/128"),
        net("::1/128"),
    ]


def test_the_deny_list_always_holds_loopback_and_link_local_and_merges_overlaps() -> None:
    merged = deny_list([parse_cidr("192.0.2.77/24")], [net("192.0.2.2/32"), net("fd00::2/128")])
    assert merged == [
        net("0.0.0.0/8"),
        net("127.0.0.0/8"),
        net("169.254.0.0/16"),
        net("192.0.2.0/24"),  # the host's address inside the operator's network: one interval
        net("::/127"),  # :: and ::1
        net("fd00::2/128"),
        net("fe80::/10"),
    ]
    for always in ALWAYS_DENIED:
        assert any(always.subnet_of(m) for m in merged if m.version == always.version)  # type: ignore[arg-type]


def test_the_rules_reject_the_denied_sets_off_loopback() -> None:
    rules = ruleset(deny_list([], [net("192.0.2.2/32")]))
    assert "elements = { 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 192.0.2.2/32 }" in rules
    assert "elements = { ::/127, fe80::/10 }" in rules
    assert rules.index('oifname "lo" accept') < rules.index("ip daddr @deny4 reject")


def test_a_deny_option_that_is_not_a_network_is_refused() -> None:
    with pytest.raises(ConfigError, match="--job-network-deny 'lan': not a network"):
        parse_cidr("lan")


def test_a_private_plan_carries_pasta_and_the_rules_and_needs_them() -> None:
    tools = PrivateNetwork("/usr/bin/pasta", "/usr/sbin/nft", (net("10.0.0.0/8"),))
    plan = IsolationPlan(Account("nobody", 65534, 65534), Network.PRIVATE, private_network=tools)
    fields = plan.launcher_fields(0, 0)
    assert "pasta=/usr/bin/pasta" in fields and "nft=/usr/sbin/nft" in fields
    assert any(f.startswith("nft_rules=") and "10.0.0.0/8" in f for f in fields)
    assert plan.relayed
    assert not IsolationPlan(Account("nobody", 65534, 65534), Network.NONE).relayed
    with pytest.raises(ValueError, match="a private network needs"):
        IsolationPlan(Account("nobody", 65534, 65534), Network.PRIVATE)


def test_the_whitelist_grants_the_host_network(tmp_path: Path) -> None:
    whitelist = tmp_path / "authz.toml"
    whitelist.write_text(
        '[[clients]]\nidentity = "ci"\nrole = "user"\nnetworks = ["host"]\n\n'
        '[[clients]]\nidentity = "alice"\nrole = "user"\n'
    )
    authz = Authz.from_file(whitelist)
    assert (authz.networks("ci"), authz.networks("alice")) == (("host",), None)
    whitelist.write_text('[[clients]]\nidentity = "ci"\nrole = "user"\nnetworks = ["bridge"]\n')
    with pytest.raises(ConfigError, match=r"networks must be a list of 'host'"):
        Authz.from_file(whitelist)


def test_host_is_refused_without_a_grant() -> None:
    isolation = Isolation(network=Network.NONE)
    spec = JobSpec("true", network="host")
    with pytest.raises(PermissionDenied, match="'alice' may not use the host's network"):
        isolation._network(spec, "alice", None)
    assert isolation._network(spec, "ci", ("host",)) is Network.HOST
    assert isolation._network(JobSpec("true"), "alice", None) is Network.NONE

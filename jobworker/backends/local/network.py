"""A job's private network: its own namespace with a way out, and no way to the host.

The launcher gives a ``private`` job a network namespace of its own and connects it with
``pasta`` (Debian package ``passt``): a userspace network stack that turns the job's
connections into ordinary sockets of a helper process on the host, so it works for a
server that is not root too. ``pasta`` reaches whatever the host reaches, the host's own
addresses included; an nftables table inside the job's namespace (package ``nftables``)
rejects, before the command runs and before its capabilities are dropped, every
destination of :func:`deny_list`: the host's loopback and its own addresses (read again
for each job, so a new address is covered from the next start), link-local
169.254.0.0/16 and fe80::/10 (cloud metadata services live there), and the networks the
operator names with ``--job-network-deny``. The job cannot change the rules: it has no
CAP_NET_ADMIN over the namespace (nor any user namespace that owns it).

``pasta``'s options, and why (each checked on Debian 12's passt 2023-03):

* ``--config-net``: it gives the namespace an interface with the host's address and a
  default route, so ``pip install`` needs nothing from the job;
* ``-t none -u none``: it would otherwise bind on the host every port the job listens on;
* ``-T none -U none``: it would otherwise forward the host's bound ports into the job's
  loopback (the job would reach the host's 127.0.0.1 services);
* ``--no-map-gw``: it would otherwise map the gateway's address to the host;
* ``-f``: it stays the launcher's child, killed when the job's launcher exits
  (``PR_SET_PDEATHSIG``), and it writes its pid (``-P``) once the namespace is ready;
* ``--runas 0`` when the server is root: it would drop to ``nobody``, which may not join
  a namespace root created;
* ``--no-netns-quit``: it would otherwise watch the directory of the namespace's path
  (``/proc/self/fd``) with inotify, to quit when the path goes; its launcher kills it
  instead, and tearing that watch down made its exit, on every job's end, 36 -> 20 ms
  (p50 here).

The launcher's side is in :mod:`jobworker.backends.local._launcher_net` (``net_helper``,
``connect_network``, ``await_network``); this module builds what it needs as data.

What it costs, and where (docs/performance.md, "Private job networks"): pasta's start
takes 15-20 ms of CPU (it faults in about 30 MiB of its own tables), and its exit waits
for the kernel to tear its tap device down (an RCU barrier, 20 ms or more). So the rules
are installed while pasta starts, PID 1 builds the job's filesystem view meanwhile and
waits for pasta only before the command's process exists, and the job's end does not
wait for pasta's exit. A warm pool of namespaces connected ahead of time would take
pasta's start off the start path too; it is not done (docs/performance.md says why).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from jobworker.errors import ConfigError

Net = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Never reachable from a private job, whatever the host's addresses are: "this host"
#: (0.0.0.0 and :: mean the host itself to a socket there), loopback, link-local.
ALWAYS_DENIED: tuple[Net, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "::/128", "::1/128", "fe80::/10")
)
#: pasta's options; the launcher adds where the namespace is and where the pid goes.
PASTA_OPTIONS = (
    "--quiet",
    "--foreground",
    "--config-net",
    *("-t", "none", "-u", "none", "-T", "none", "-U", "none"),
    "--no-map-gw",
    "--no-netns-quit",
)
#: Where the tools are on Debian, for a server whose PATH lacks the sbin directories.
_SEARCH_PATH = os.pathsep.join(("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"))
_TUN = "/dev/net/tun"


def parse_cidr(text: str) -> Net:
    """A ``--job-network-deny`` value; host bits are allowed (``10.1.2.3/8`` is 10/8)."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(
            f"--job-network-deny {text!r}: not a network; write an address or CIDR such as"
            " 10.0.0.0/8 or fd00::/8"
        ) from None


def host_addresses(proc_net: Path = Path("/proc/net")) -> list[Net]:
    """Every address of this host, as single-address networks, read from ``/proc/net``:
    IPv4 from the local routing table (``fib_trie``), IPv6 from ``if_inet6``."""
    found: list[Net] = []
    try:
        lines = (proc_net / "fib_trie").read_text().splitlines()
    except OSError:
        lines = []
    leaf = ""
    for line in lines:
        # "  |-- 192.0.2.2" then its routes, one of them "/32 host LOCAL": this host's.
        if "|--" in line:
            leaf = line.split("|--", 1)[1].strip()
        elif line.strip() == "/32 host LOCAL" and leaf:
            found.append(ipaddress.ip_network(leaf))
    try:
        entries = (proc_net / "if_inet6").read_text().splitlines()
    except OSError:
        entries = []
    for entry in entries:
        digits = entry.split()[0]
        found.append(ipaddress.ip_network(":".join(digits[i : i + 4] for i in range(0, 32, 4))))
    return found


def deny_list(operator: Iterable[Net], addresses: Iterable[Net]) -> list[Net]:
    """What a private job may not reach, merged: nftables refuses overlapping intervals."""
    wanted = [*ALWAYS_DENIED, *operator, *addresses]
    v4 = [n for n in wanted if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in wanted if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def ruleset(deny: Sequence[Net]) -> str:
    """The nftables table a private job's namespace gets: its own loopback (which carries
    its own addresses too) allowed, every denied destination rejected at once."""
    v4 = ", ".join(str(n) for n in deny if n.version == 4)
    v6 = ", ".join(str(n) for n in deny if n.version == 6)
    return (
        "table inet jobworker {\n"
        f"  set deny4 {{ type ipv4_addr; flags interval; elements = {{ {v4} }}; }}\n"
        f"  set deny6 {{ type ipv6_addr; flags interval; elements = {{ {v6} }}; }}\n"
        "  chain output {\n"
        "    type filter hook output priority 0; policy accept;\n"
        '    oifname "lo" accept\n'
        "    ip daddr @deny4 reject with icmpx type admin-prohibited\n"
        "    ip6 daddr @deny6 reject with icmpx type admin-prohibited\n"
        "  }\n"
        "}\n"
    )


@attrs.frozen
class PrivateNetwork:
    """The server's means to give jobs a private network: found once, at start-up."""

    pasta: str
    nft: str
    #: The operator's ``--job-network-deny`` networks.
    deny: tuple[Net, ...] = ()

    @classmethod
    def find(cls, deny: Iterable[Net], user_namespace: bool) -> PrivateNetwork:
        """The tools on this host; ConfigError naming the missing package otherwise."""
        missing = [
            f"{tool} (Debian package {package})"
            for tool, package in (("pasta", "passt"), ("nft", "nftables"))
            if not _which(tool)
        ]
        if missing:
            raise ConfigError(
                f"private job networks need {' and '.join(missing)}: install it, or choose"
                " --job-network none (no network) for every job"
            )
        if user_namespace and not os.access(_TUN, os.R_OK | os.W_OK):
            raise ConfigError(
                f"private job networks need {_TUN} readable and writable by this server's"
                f" uid {os.getuid()} (its usual mode is 0666); fix it, run as root, or choose"
                " --job-network none"
            )
        return cls(str(_which("pasta")), str(_which("nft")), tuple(deny))

    def launcher_fields(self) -> list[str]:
        """The launcher's instructions for one job, with the host's addresses of now."""
        rules = ruleset(deny_list(self.deny, host_addresses()))
        fields = [f"pasta={self.pasta}", *(f"pasta_arg={a}" for a in PASTA_OPTIONS)]
        if os.geteuid() == 0:
            fields += ["pasta_arg=--runas", "pasta_arg=0"]
        return [*fields, f"nft={self.nft}", f"nft_rules={rules}"]


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path=_SEARCH_PATH)

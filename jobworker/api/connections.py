"""Connections bounded before anyone is authenticated: the server's front door.

A client proves who it is only at the end of its TLS handshake, so everything a stranger
can make the server hold is bounded here, whoever it is (docs/security.md, "Connection
limits"):

* a connection must finish its TLS handshake within ``handshake_timeout`` seconds
  (grpc's ``grpc.server_handshake_timeout_ms``);
* at most ``max_connections`` are open at once (grpc's
  ``grpc.max_allowed_incoming_connections``: grpc closes the one past it as soon as it
  accepts it);
* at most ``max_connections_per_peer`` not yet authenticated from one address: grpc has no
  such limit, so :class:`PeerGate` looks at the server's socket descriptors four times a
  second while connections arrive (once a second when none has for a while) and,
  whenever one is new, lists the server's connections with the kernel's
  ``sock_diag`` netlink interface and shuts the newest of a peer's surplus down, sparing
  every connection that has carried an authenticated RPC (the admission step tells it,
  :meth:`PeerGate.authenticated`); a flood from one address can
  then never hold the slots everyone else needs, and never cuts a client that proved who
  it is;
* a connection lives at most ``max_connection_age`` seconds (grpc's
  ``grpc.max_connection_age_ms``; grpc sends GOAWAY and the client reconnects, with a new
  handshake that checks its certificate again; streams open on it go on, watched by
  :mod:`jobworker.api.openstreams`).

:func:`raise_file_limit` lifts ``RLIMIT_NOFILE`` to its hard limit at start-up and keeps a
reserve of descriptors for jobs (pipes, spool files, pidfds) out of the connections' reach.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import os
import resource
import socket
import struct
from collections.abc import Iterator

import attrs
import structlog

from jobworker.errors import ConfigError

log = structlog.get_logger("jobworker.api.connections")

DEFAULT_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_CONNECTIONS_PER_PEER = 32
DEFAULT_MAX_CONNECTION_AGE = 300.0
#: Descriptors a running job may hold in the server at once: its pidfd, its output
#: pipes' read ends (and their copies while the ingest process takes them), its spool
#: file, its stdin pipe and its cgroup's event watch.
FDS_PER_JOB = 8
#: Descriptors the server itself needs besides jobs and connections (listening sockets,
#: grpc's and asyncio's own, logs, the ingest process's socket, /proc reads...).
FDS_BASE = 256
#: How often :class:`PeerGate` looks at the open connections while new ones arrive.
GATE_PERIOD = 0.25
#: Its longest pause while none does: each pass that finds no new socket doubles the
#: pause up to this. An idle server's wake-ups are most of its CPU (4 a second cost the
#: Ray front 2.5 ms/s of its 6.5 on the 2-core test host); a flood is first cut within
#: this, then every ``GATE_PERIOD``.
GATE_IDLE_PERIOD = 1.0
#: How long :class:`PeerGate` waits after a pass failed.
GATE_RETRY = 5.0


@attrs.frozen(kw_only=True)
class ConnectionLimits:
    """What a connection may hold before and after its client is authenticated."""

    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER
    max_connection_age: float = DEFAULT_MAX_CONNECTION_AGE

    def __attrs_post_init__(self) -> None:
        if self.handshake_timeout <= 0 or self.max_connection_age <= 0:
            raise ConfigError("--handshake-timeout and --max-connection-age must be above 0")
        if not 0 < self.max_connections_per_peer <= self.max_connections:
            raise ConfigError(
                "--max-connections-per-peer must be at least 1 and at most --max-connections"
            )

    def grpc_options(self) -> list[tuple[str, int]]:
        """The grpc server options that enforce all but the per-peer limit."""
        return [
            ("grpc.server_handshake_timeout_ms", round(self.handshake_timeout * 1000)),
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.max_connection_age_ms", round(self.max_connection_age * 1000)),
        ]


def raise_file_limit(limits: ConnectionLimits, max_running: int) -> ConnectionLimits:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard one, and return ``limits`` with at most
    as many connections as fit beside the jobs' reserve; when the limit is too low for
    both, connections keep a quarter of it (at least the per-peer cap) and a warning says
    that jobs may run short of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    reserve = FDS_BASE + FDS_PER_JOB * max_running
    room = hard - reserve
    log.info("file_limit", nofile=hard, reserved_for_jobs=reserve)
    if limits.max_connections <= room:
        return limits
    floor = min(limits.max_connections, max(hard // 4, limits.max_connections_per_peer))
    connections = max(room, floor)
    log.warning(
        "connections_capped",
        max_connections=connections,
        asked=limits.max_connections,
        reason=f"RLIMIT_NOFILE is {hard}, and {reserve} are kept for --max-jobs {max_running}",
        consequence=None
        if room >= floor
        else f"{max_running} running jobs could run out of descriptors: raise the limit"
        " (LimitNOFILE= in the unit, ulimit -Hn) or lower --max-jobs",
    )
    return attrs.evolve(limits, max_connections=connections)


# -- the per-peer gate ---------------------------------------------------------------------

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLMSG_HEADER = struct.Struct("=IHHII")
_TCP_ESTABLISHED = 1
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_BC_S_EQ = 11
#: family, protocol, ext, pad, states; then the socket id (ports, addresses, ...).
_REQUEST = struct.Struct("=BBBBI48x")
#: family, state, timer, retrans; sport, dport (big-endian), src, dst; interface, cookie;
#: expires, rqueue, wqueue, uid, inode.
_DIAG_MSG = struct.Struct("=BBBB2H16s16sI8sIIIII")


@attrs.frozen
class Connection:
    """One established connection to the server's port, as the kernel lists it."""

    peer: str
    port: int
    inode: int


def _request(family: int, port: int) -> bytes:
    # In-kernel filter: only sockets whose local port is ``port``.
    bytecode = struct.pack("=BBHBBH", _INET_DIAG_BC_S_EQ, 8, 12, 0, 0, port)
    attribute = struct.pack("=HH", 4 + len(bytecode), _INET_DIAG_REQ_BYTECODE) + bytecode
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_ESTABLISHED) + attribute
    header = _NLMSG_HEADER.pack(
        _NLMSG_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
    )
    return header + body


def _peer(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    address = ipaddress.IPv6Address(raw)
    return str(address.ipv4_mapped or address)


def established(port: int) -> list[Connection]:
    """The established TCP connections whose local port is ``port`` (this network
    namespace, IPv4 and IPv6)."""
    found: list[Connection] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            nl.send(_request(family, port))
            found += _receive(nl, port)
    return found


def _receive(nl: socket.socket, port: int) -> list[Connection]:
    found: list[Connection] = []
    while True:
        data = nl.recv(1 << 16)
        offset = 0
        while offset + _NLMSG_HEADER.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(data, offset)
            if kind == _NLMSG_DONE:
                return found
            if kind == _NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, offset + _NLMSG_HEADER.size)
                raise OSError(-code, os.strerror(-code))
            fields = _DIAG_MSG.unpack_from(data, offset + _NLMSG_HEADER.size)
            family, sport, dport, remote, inode = fields[0], *fields[4:6], fields[7], fields[-1]
            if socket.ntohs(sport) == port and inode:
                found.append(Connection(_peer(family, remote), socket.ntohs(dport), inode))
            offset += (length + 3) & ~3
        if not data:
            return found


def surplus(
    connections: list[Connection], per_peer: int, spared: set[tuple[str, int]]
) -> list[Connection]:
    """The connections past ``per_peer`` of each address, but for those ``spared`` (as
    ``(peer, port)``): the newest (the kernel numbers socket inodes in creation order), so
    a peer's oldest connections are kept."""
    by_peer: dict[str, list[Connection]] = collections.defaultdict(list)
    for connection in connections:
        if (connection.peer, connection.port) not in spared:
            by_peer[connection.peer].append(connection)
    cut: list[Connection] = []
    for held in by_peer.values():
        if len(held) > per_peer:
            held.sort(key=lambda c: c.inode)
            cut += held[per_peer:]
    return cut


def _socket_fds() -> Iterator[tuple[int, int]]:
    """``(fd, inode)`` of each of this process's socket descriptors."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith("socket:["):
                yield int(name), int(target[8:-1])


def socket_inodes() -> set[int]:
    """The inodes of this process's sockets: a connection grpc accepted is one of them."""
    return {inode for _fd, inode in _socket_fds()}


def shut_down(inodes: set[int]) -> int:
    """Shut down this process's sockets ``inodes`` (grpc then closes them); how many."""
    done = 0
    for fd, inode in _socket_fds():
        if inode not in inodes:
            continue
        try:
            copy = os.dup(fd)
        except OSError:
            continue
        try:
            if os.fstat(copy).st_ino != inode:
                continue  # the number was reused since the listing
            with socket.socket(fileno=copy) as sock:
                copy = -1
                sock.shutdown(socket.SHUT_RDWR)
            done += 1
        except OSError:
            pass
        finally:
            if copy >= 0:
                os.close(copy)
    return done


def _address(peer: str) -> tuple[str, int] | None:
    """grpc's ``context.peer()`` (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``) as ``(ip, port)``,
    the way :func:`established` names connections."""
    kind, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isdigit():
        return None
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(port)


class PeerGate:
    """Keeps each address within its share of connections not yet authenticated; see the
    module docstring. Made before the server listens, started once its port is known."""

    def __init__(self, per_peer: int) -> None:
        self._per_peer = per_peer
        self._port = 0
        #: Authenticated connections, with the pass during which each was reported.
        self._spared: dict[tuple[str, int], int] = {}
        self._passes = 0
        #: The server's sockets as of the last listing: until one is new, no peer can
        #: have gone over its share, and the listing (a walk of the kernel's whole TCP
        #: table, about 2 ms here) is skipped.
        self._known: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def authenticated(self, peer: str) -> None:
        """The connection of ``peer`` (grpc's ``context.peer()``) carried an authenticated
        RPC: never cut it (on the event loop)."""
        address = _address(peer)
        if address is not None:
            self._spared[address] = self._passes

    def start(self, port: int) -> None:
        self._port = port
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def enforce(self) -> int:
        """One pass: shut the surplus down; how many connections were."""
        sockets = socket_inodes()
        if sockets <= self._known:
            return 0  # no connection accepted since the last listing
        self._passes += 1
        listing = self._passes
        connections = await asyncio.to_thread(established, self._port)
        self._known = sockets
        # Forget the closed ones; one reported while the kernel listed may not be listed.
        open_now = {(c.peer, c.port) for c in connections}
        for address, reported in list(self._spared.items()):
            if reported < listing and address not in open_now:
                del self._spared[address]
        extra = surplus(connections, self._per_peer, set(self._spared))
        if not extra:
            return 0
        done = await asyncio.to_thread(shut_down, {c.inode for c in extra})
        peers = collections.Counter(c.peer for c in extra)
        log.warning(
            "connections_over_peer_limit",
            closed=done,
            peers=dict(peers.most_common(5)),
            max_connections_per_peer=self._per_peer,
        )
        return done

    async def _run(self) -> None:
        pause = GATE_PERIOD
        while True:
            known = self._known
            try:
                await self.enforce()
            except OSError as err:  # out of descriptors for a moment, say: try again later
                log.error("peer_gate_failed", error=str(err), retry_in=GATE_RETRY)
                pause = GATE_RETRY
            else:
                arrived = self._known is not known  # a new socket was listed
                pause = GATE_PERIOD if arrived else min(pause * 2, GATE_IDLE_PERIOD)
            await asyncio.sleep(pause)

"""Where a server listens and a client dials: the defaults, and ``--server`` as a gRPC
target (a module of its own: the server's configuration and the light client both need
it, and nothing more of each other)."""

from __future__ import annotations

from collections.abc import Sequence

from jobworker.errors import UsageError

DEFAULT_PORT = 50051
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"


def with_default_port(address: str) -> str:
    """``HOST`` -> ``HOST:50051`` (grpc would dial 443); ``HOST:PORT`` and ``[V6]:PORT``
    unchanged, a bare IPv6 address bracketed."""
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{DEFAULT_PORT}"
    if address.count(":") > 1:  # a bare IPv6 address
        return f"[{address}]:{DEFAULT_PORT}"
    return address if ":" in address else f"{address}:{DEFAULT_PORT}"


#: gRPC target schemes a ``--server`` value may start with, passed to grpc as they are.
_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def dial_target(servers: str, server_name: str | None = None) -> tuple[str, str | None]:
    """The gRPC target for ``--server`` and the name the server's certificate must list
    (None: the host dialled).

    ``HOST[:PORT]`` is one server; ``ADDR[:PORT],ADDR[:PORT],...`` several (a cluster's
    front servers: IP addresses, one family), dialled as grpc's ``ipv4:``/``ipv6:``
    target, whose name to verify is their common host or else ``server_name``; a gRPC
    target (``dns:///NAME:PORT``, ``ipv4:...``) is used as it is. Raises UsageError."""
    if servers.startswith(_TARGET_SCHEMES):
        scheme, _, rest = servers.partition(":")
        if scheme == "dns":
            return servers, server_name
        addresses = rest.split(",")
        target = servers
    else:
        addresses = [with_default_port(a.strip()) for a in servers.split(",")]
        if len(addresses) == 1:
            return addresses[0], server_name
        target = f"{_family(servers, addresses)}:{','.join(addresses)}"
    hosts = {a.rsplit(":", 1)[0].strip("[]") for a in addresses}
    if server_name is None:
        if len(hosts) > 1:
            raise UsageError(
                f"--server {servers}: several hosts need --server-name NAME (or"
                " JOBWORKER_SERVER_NAME), the name every one's certificate lists"
            )
        server_name = hosts.pop()
    return target, server_name


def _family(servers: str, addresses: Sequence[str]) -> str:
    """grpc's scheme for a list of IP addresses: ``ipv4`` or ``ipv6``."""
    import ipaddress

    versions = set()
    for address in addresses:
        try:
            versions.add(ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]")).version)
        except ValueError:
            raise UsageError(
                f"--server {servers}: several servers must be IP addresses ({address} is"
                " not; grpc resolves one name per target): list their addresses, or give"
                " one DNS name that resolves to every one as dns:///NAME:PORT"
            ) from None
    if len(versions) > 1:
        raise UsageError(f"--server {servers}: list IPv4 or IPv6 addresses, not both")
    return f"ipv{versions.pop()}"

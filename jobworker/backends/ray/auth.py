"""Whether a Ray cluster authenticates its callers, asked before the front joins it.

Ray's ports run code for anyone who reaches them unless the cluster uses token
authentication (Ray 2.52+: every node and driver started with ``RAY_AUTH_MODE=token`` and
the same token, from ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``). Our own environment
does not tell how the cluster was started, so the front asks the GCS itself: one call
without a token, which an authenticating cluster answers UNAUTHENTICATED.
"""

from __future__ import annotations

import os

import grpc
import structlog

from jobworker.errors import ConfigError

log = structlog.get_logger("jobworker.ray.auth")

#: A GCS call any caller may make on a cluster without authentication.
_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"
_PROBE_TIMEOUT = 10.0
UNAUTHENTICATED_RISK = "anyone who reaches the cluster's ports runs code on every node"
_FIX = (
    "start every Ray node and this server with RAY_AUTH_MODE=token and"
    " RAY_AUTH_TOKEN_PATH=FILE (docs/cluster.md)"
)


async def _answers_without_token(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        probe = channel.unary_unary(
            _PROBE, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            await probe(b"", timeout=_PROBE_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.UNAUTHENTICATED:
                return False
            raise ConfigError(
                f"cannot reach the Ray GCS at {address}: {err.code().name} ({err.details()})"
            ) from None
    return True


async def check_cluster(address: str, *, allow_unauthenticated: bool) -> bool:
    """True when the cluster at ``address`` authenticates and this process holds a token
    for it; False when it does not but the operator allowed that (logged). Else
    ConfigError, one line naming the fix."""
    if await _answers_without_token(address):
        if not allow_unauthenticated:
            raise ConfigError(
                f"the Ray cluster at {address} does not authenticate ({UNAUTHENTICATED_RISK}):"
                f" {_FIX}, or pass --ray-allow-unauthenticated"
            )
        log.warning("ray_cluster_unauthenticated", address=address,
                    consequence=UNAUTHENTICATED_RISK)  # fmt: skip
        return False
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        raise ConfigError(
            f"the Ray cluster at {address} requires its token: start this server with"
            " RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=FILE (the cluster's token)"
        )
    return True

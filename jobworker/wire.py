"""Domain limits on the wire, shared by the two edges that speak protobuf.

The service (jobworker.service) and the client (jobworker.client) are the only modules
that translate between protobuf and domain objects; what both need lives here.
"""

from __future__ import annotations

from jobworker.model import Limits
from jobworker.v1 import jobworker_pb2 as pb

#: Where a server listens, and a client connects, unless told otherwise.
DEFAULT_ADDRESS = "127.0.0.1:50051"


def limits_to_pb(limits: Limits) -> pb.Limits:
    """Limits as sent: on the wire 0 means "not limited", where the model says None."""
    return pb.Limits(
        cpu=limits.cpu or 0.0,
        cpu_weight=limits.cpu_weight or 0,
        memory_bytes=limits.memory or 0,
        memory_high_bytes=limits.memory_high or 0,
        pids=limits.pids or 0,
        io=[
            pb.IoDeviceLimit(
                device=io.device,
                read_bps=io.rbps or 0,
                write_bps=io.wbps or 0,
                read_iops=io.riops or 0,
                write_iops=io.wiops or 0,
            )
            for io in limits.io
        ],
    )

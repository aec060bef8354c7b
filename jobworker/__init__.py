"""jobworker: run Linux commands for remote clients, safely."""

# jobworker.tls must import grpc before anything else does: grpc reads the setting that
# refuses TLS 1.2 only once, at import (docs/security.md).
import jobworker.tls  # noqa: F401  # isort: skip
from jobworker.hooks import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]

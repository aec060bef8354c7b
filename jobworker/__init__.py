"""jobworker: run Linux commands for remote clients, safely."""

# Kept light: a plugin author's ``from jobworker import hookimpl`` imports neither grpc nor
# cryptography (modules that use grpc import it through jobworker.api.grpcenv).
from jobworker.hooks import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]

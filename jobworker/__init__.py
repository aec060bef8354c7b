"""jobworker: run Linux commands for remote clients, safely."""

from jobworker.hooks import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]

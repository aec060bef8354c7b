"""jobworker: run Linux commands for remote clients, safely."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobworker.hooks import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]


def __getattr__(name: str) -> object:
    """``hookimpl`` on first use: a plugin author writes ``from jobworker import hookimpl``,
    and a client, which never needs pluggy, does not import it (docs/performance.md)."""
    if name == "hookimpl":
        from jobworker.hooks import hookimpl

        return hookimpl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

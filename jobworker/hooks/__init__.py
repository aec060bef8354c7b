"""Hook markers. ``jobworker`` is the project name, the marker name and the entry-point group."""

from __future__ import annotations

import pluggy

PROJECT_NAME = "jobworker"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

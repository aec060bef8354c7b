"""The ``jobworker`` program (its console script, and ``python -m jobworker``)."""

from __future__ import annotations

import gc
from typing import NoReturn


def run() -> NoReturn:
    """Import the command line and run it, sparing the garbage collector the imports.

    What the imports create (modules, classes, protobuf descriptors) lives until exit:
    collecting while importing finds nothing to free, and walking it again during the
    command or when the interpreter exits is wasted. Collection is off while importing,
    and what was imported is frozen out of its reach; about a sixth of the CPU of
    ``jobworker run -- true`` (docs/performance.md, "The client's start-up").
    """
    gc.disable()
    try:
        from jobworker.cli.main import main
    finally:
        gc.freeze()
        gc.enable()
    raise SystemExit(main())


if __name__ == "__main__":
    run()

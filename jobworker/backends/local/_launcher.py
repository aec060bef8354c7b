"""The job launcher: the first program of every job, run as ``python -I -S _launcher.py``.

The server never forks itself (grpcio's threads make fork unsafe); it ``posix_spawn``s this
script, which runs alone in a fresh session and, in this order:

1. reads its instructions from fd 0, then moves the job's stdin (fd 5: a pipe the server
   writes, or /dev/null) to fd 0;
2. joins the job's containment (writes ``0`` to the cgroup's ``cgroup.procs``), so the
   user's command is contained from its first instruction;
3. when the job has an isolation plan, carries it out (namespaces, its own filesystem
   view, an unprivileged account; see :mod:`jobworker.backends.local.isolation`): this
   process then stays as the job's PID 1 and the rest happens in its child;
4. changes directory, closes every descriptor but 0, 1, 2 and the status pipe, and gives
   signals their default disposition and an empty mask (Python ignores SIGPIPE, and ignored
   signals survive ``execve``);
5. ``execve``s the command. The status pipe (fd 3) is close-on-exec: the server reads EOF
   when the exec succeeded, or one error report when a step failed. An isolated job's PID 1
   writes the command's wait status to the exit report (fd 4, a file) before it exits: the
   server's own child is then PID 1, which no signal from inside its namespace can kill.
   Under ``serve --live-restore`` a job without namespaces gets such a first process too
   (``monitor``), since the server that reaps it may be gone when the command ends.
   PID 1 and its parent close their copies of fd 0, so the command alone holds the stdin
   pipe's read end and the server's writer sees EPIPE once the command is gone.

Instructions and reports are NUL-separated fields (no job string may hold a NUL): importing
``json`` or ``signal`` would pull in ``re`` and ``enum`` and triple the start-up time. Only
built-in modules, and no ``site``: it must start in milliseconds.

Its code is in the modules beside it, each one part: ``_launcher_main`` (the two ways in,
and :func:`launch`), ``_launcher_isolate`` (the plan), ``_launcher_net`` (a private
network), ``_launcher_pid1`` (the processes that stay above the command) and
``_launcher_base`` (what they share). This script loads them by explicit path, all of them,
before the first step: ``-I`` keeps its own directory off ``sys.path``, so no module is
ever found by name in a place a job might write, and none is read once the job's
namespaces, filesystem view or uid are in place. They are not imported through the
``jobworker`` package (its ``__init__`` and the server's modules would cost more than the
rest of the start); each is registered under its name in that package, so their relative
imports find one another and nothing else. Loaded as modules, not run as a script, they
come from their cached bytecode: compiling them would add about 3 ms to every start.
"""

import os
import sys

# The loader every import of a ``.py`` file uses, from the import system already in memory
# (``importlib.machinery`` has the same class, but imports ``importlib`` and ``warnings``).
from _frozen_importlib_external import SourceFileLoader

PACKAGE = "jobworker.backends.local"
#: Each after the ones it imports.
MODULES = (
    "_launcher_base",
    "_launcher_net",
    "_launcher_pid1",
    "_launcher_isolate",
    "_launcher_main",
)


def load(name: str) -> None:
    """Run the module ``name`` from this file's directory, registered in ``sys.modules``."""
    path = os.path.join(os.path.dirname(__file__), name + ".py")
    module = type(sys)(f"{PACKAGE}.{name}")
    module.__file__ = path
    module.__package__ = PACKAGE
    sys.modules[module.__name__] = module
    SourceFileLoader(module.__name__, path).exec_module(module)


if __name__ == "__main__":
    for name in MODULES:
        load(name)
    sys.modules[f"{PACKAGE}._launcher_main"].main()

"""Where job output is spooled, and how a crashed server's spool is reclaimed.

A spool root (``--spool-dir``, or ``jobworker-spool-<uid>`` under ``$XDG_RUNTIME_DIR`` or
the temporary directory) holds one ``run-*`` directory per server run. The running server
holds an exclusive ``flock`` on its run's ``.lock`` file; the kernel drops it however the
server ends, SIGKILL included. At start-up a server removes every sibling run whose lock it
can take: those servers are gone, and so is any reason to keep their output. Several
servers may share a root; none removes another live server's files.

With ``serve --live-restore`` the run is ``<root>/live`` instead, kept when the server
stops: it holds the running jobs' records and output for the next server
(:mod:`jobworker.backends.local.record`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from jobworker.errors import ConfigError

log = structlog.get_logger("jobworker.backends.local.spool")

_LOCK = ".lock"
#: The name of a run while it is being made (not yet locked).
_NEW = ".new-"
#: A run still being made after this long was left by a server that died making it.
NEW_RUN_SECONDS = 60.0
#: The run directory of ``serve --live-restore`` under the spool root.
LIVE_RUN = "live"


def default_root() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base is None or not os.path.isdir(base):
        base = tempfile.gettempdir()
    return Path(base) / f"jobworker-spool-{os.getuid()}"


def _prepare_root(root: Path) -> None:
    """Create ``root`` (0700), and refuse one that another user could have planted."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(root)
    except OSError as err:
        raise ConfigError(f"cannot create spool directory {root}: {err.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"spool directory {root} is not a directory (a symlink?)")
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"spool directory {root} belongs to uid {info.st_uid}, not {os.getuid()}:"
            " pass --spool-dir with a directory of your own"
        )
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"spool directory {root} is not writable by uid {os.getuid()}")


def _reclaim_stale_runs(root: Path) -> None:
    for run in sorted(root.glob("run-*")):
        _reclaim(run)
    for new in root.glob(_NEW + "*"):  # a server that died while making its run
        with contextlib.suppress(OSError):
            if new.stat().st_mtime < time.time() - NEW_RUN_SECONDS:
                _reclaim(new)


def _reclaim(run: Path) -> None:
    """Remove the run ``run`` unless its server lives (holds its lock)."""
    try:
        fd = os.open(run / _LOCK, os.O_RDWR)
    except FileNotFoundError:
        return  # not a run of ours
    except OSError as err:
        log.warning("spool_run_unreadable", run=str(run), error=err.strerror)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        files = sum(1 for p in run.iterdir() if p.name != _LOCK)
        shutil.rmtree(run)
        log.info("spool_stale_run_removed", run=str(run), files=files)
    except BlockingIOError:
        pass  # a live server's run
    except OSError as err:
        log.warning("spool_stale_run_kept", run=str(run), error=err.strerror)
    finally:
        os.close(fd)


@contextmanager
def spool_run(root: Path | None, live: bool = False) -> Iterator[Path]:
    """This server's spool directory under ``root``; removed when the server stops.

    ``live`` (``serve --live-restore``): the directory is ``<root>/live``, the same for
    every run, and outlives the server: the next one adopts the jobs it describes. Only
    one server at a time may use it.
    """
    root = default_root() if root is None else root
    _prepare_root(root)
    _reclaim_stale_runs(root)
    if live:
        with _live_run(root / LIVE_RUN) as run:
            yield run
        return
    # Made under a name the reclaimers of other servers do not look at, locked, and only
    # then named ``run-*``: else one could take the lock in the instant between its
    # creation and ours, and remove a new run as stale (32 agents starting on one
    # machine did).
    new = Path(tempfile.mkdtemp(prefix=_NEW, dir=root))
    lock = os.open(new / _LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    run = new
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = root / ("run-" + new.name.removeprefix(_NEW))
        new.rename(run)
        yield run
    finally:
        shutil.rmtree(run, ignore_errors=True)
        os.close(lock)


@contextmanager
def _live_run(run: Path) -> Iterator[Path]:
    try:
        run.mkdir(mode=0o700, exist_ok=True)
        lock = os.open(run / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise ConfigError(f"cannot create spool directory {run}: {err.strerror}") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another jobworker serve --live-restore uses {run}: stop it, or give this"
                " one another --spool-dir"
            ) from None
        yield run
    finally:
        os.close(lock)

"""Where job output is spooled, and how a crashed server's spool is reclaimed.

A spool root (``--spool-dir``, or ``jobworker-spool-<uid>`` under ``$XDG_RUNTIME_DIR`` or
the temporary directory) holds one ``run-*`` directory per server run. The running server
holds an exclusive ``flock`` on its run's ``.lock`` file; the kernel drops it however the
server ends, SIGKILL included. At start-up a server removes every sibling run whose lock it
can take: those servers are gone, and so is any reason to keep their output. Several
servers may share a root; none removes another live server's files.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from jobworker.errors import ConfigError

log = structlog.get_logger("jobworker.backends.local.spool")

_LOCK = ".lock"


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
        try:
            fd = os.open(run / _LOCK, os.O_RDWR)
        except FileNotFoundError:
            continue  # a run being created this instant, or not ours: leave it
        except OSError as err:
            log.warning("spool_run_unreadable", run=str(run), error=err.strerror)
            continue
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
def spool_run(root: Path | None) -> Iterator[Path]:
    """This server's spool directory under ``root``; removed when the server stops."""
    root = default_root() if root is None else root
    _prepare_root(root)
    _reclaim_stale_runs(root)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    lock = os.open(run / _LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield run
    finally:
        shutil.rmtree(run, ignore_errors=True)
        os.close(lock)

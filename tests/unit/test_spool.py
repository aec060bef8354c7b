"""Spool runs: a crashed server's run is reclaimed, a live server's never is."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from jobworker.backends.local.spool import spool_run
from jobworker.errors import ConfigError


def test_run_is_private_and_removed_at_exit(tmp_path: Path) -> None:
    with spool_run(tmp_path / "root") as run:
        assert run.parent == tmp_path / "root"
        assert (run.parent.stat().st_mode & 0o777) == 0o700
        (run / "job.out").write_bytes(b"x")
    assert list((tmp_path / "root").iterdir()) == []


def test_dead_servers_run_is_reclaimed_live_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "root"
    dead = root / "run-dead"
    dead.mkdir(parents=True)
    (dead / ".lock").touch()  # nobody holds its lock: its server is gone
    (dead / "job.out").write_bytes(b"orphaned output")
    live = root / "run-live"
    live.mkdir()
    (live / ".lock").touch()
    (live / "job.out").write_bytes(b"someone's output")
    held = os.open(live / ".lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # as the other, running server does
    try:
        with spool_run(root) as run:
            assert not dead.exists()
            assert (live / "job.out").read_bytes() == b"someone's output"
            assert sorted(p.name for p in root.iterdir()) == sorted(["run-live", run.name])
    finally:
        os.close(held)


def _directory_of_another_user(tmp_path: Path) -> Path:
    """As root, a fresh directory handed to nobody; otherwise a system directory of root's.

    Only root can give a directory away, but any user finds directories that are not
    theirs: ``/`` or ``/usr``, where nothing would be created even if the check failed.
    """
    if os.geteuid() == 0:
        planted = tmp_path / "root"
        planted.mkdir(mode=0o777)
        os.chown(planted, 65534, 65534)
        return planted
    for candidate in (Path("/"), Path("/usr"), Path("/etc")):
        if candidate.stat().st_uid != os.getuid():
            return candidate
    pytest.skip("every system directory belongs to this uid (a user-namespace root?)")


def test_root_planted_by_another_user_is_refused(tmp_path: Path) -> None:
    planted = _directory_of_another_user(tmp_path)
    owner = planted.stat().st_uid
    before = sorted(p.name for p in planted.iterdir())
    refused = f"belongs to uid {owner}, not {os.getuid()}"
    with pytest.raises(ConfigError, match=refused), spool_run(planted):
        pass
    assert sorted(p.name for p in planted.iterdir()) == before


def test_symlinked_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not a directory"), spool_run(tmp_path / "root"):
        pass


def test_a_run_being_made_is_left_to_its_server(tmp_path: Path) -> None:
    """A run is made under a ``.new-*`` name and named ``run-*`` only once locked: a
    server starting beside it (here, the reclaim of ``spool_run``) leaves it alone while
    it is young, even with its lock free, and removes it once it is old (its maker died)."""
    root = tmp_path / "spool"
    root.mkdir(mode=0o700)
    young, old = root / ".new-young", root / ".new-old"
    for made in (young, old):
        made.mkdir()
        (made / ".lock").touch()
    os.utime(old, (0, 0))
    with spool_run(root) as run:
        assert run.name.startswith("run-") and run.parent == root
        assert young.exists(), "a run being made was removed"
        assert not old.exists(), "a run its maker left half made was kept"
        assert not any(p.name.startswith(".new-") and p != young for p in root.iterdir())

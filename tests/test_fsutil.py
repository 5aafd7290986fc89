from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from spegel_node import fsutil


def test_atomic_write_sets_0644_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        with fsutil.open_dir(tmp_path) as fd:
            fsutil.mkdir_at(fd, "ghcr.io")
            with fsutil.open_subdir(fd, "ghcr.io") as sub:
                fsutil.write_atomic_at(sub, "hosts.toml", b"server = 'x'\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ghcr.io").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ghcr.io/hosts.toml").stat().st_mode) == 0o644
    assert not [p for p in (tmp_path / "ghcr.io").iterdir() if p.name.startswith(fsutil.TMP_PREFIX)]


def test_subdir_symlink_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "ghcr.io").symlink_to(outside)
    with fsutil.open_dir(hosts) as fd, pytest.raises(OSError), fsutil.open_subdir(fd, "ghcr.io"):
        pass
    assert list(outside.iterdir()) == []


def test_file_symlink_is_not_read_and_is_replaced_not_written_through(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("keep")
    d = tmp_path / "d"
    d.mkdir()
    (d / "hosts.toml").symlink_to(secret)
    with fsutil.open_dir(d) as fd:
        with pytest.raises(OSError):
            fsutil.read_at(fd, "hosts.toml")
        fsutil.write_atomic_at(fd, "hosts.toml", b"new")
    assert secret.read_text() == "keep"  # rename replaces the link itself
    assert not (d / "hosts.toml").is_symlink()


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    (tmp_path / "hosts.toml").write_bytes(b"old")

    class Boom(Exception):
        pass

    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise Boom

    os.fsync = failing_fsync  # type: ignore[assignment]
    try:
        with fsutil.open_dir(tmp_path) as fd, pytest.raises(Boom):
            fsutil.write_atomic_at(fd, "hosts.toml", b"new")
    finally:
        os.fsync = real_fsync
    assert (tmp_path / "hosts.toml").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["hosts.toml"]


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / f"{fsutil.TMP_PREFIX}hosts.toml.999999999"
    dead.write_text("torn")
    with fsutil.open_dir(tmp_path) as fd:
        fsutil.remove_stale_temp_files(fd)
    assert not dead.exists()


def test_rmdir_only_when_empty(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b/ca.crt").write_text("x")
    with fsutil.open_dir(tmp_path) as fd:
        assert fsutil.rmdir_if_empty_at(fd, "a")
        assert not fsutil.rmdir_if_empty_at(fd, "b")
    assert (tmp_path / "b/ca.crt").exists()

"""Read the hosts dir into a snapshot for planning, without following symlinks below it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from spegel_node import fsutil
from spegel_node.hostsdir_rules import HOSTS_TOML, MAX_HOSTS_TOML
from spegel_node.plan import DirEntry, HostsSnapshot


def _file_kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _read_entry(hosts_fd: int, name: str, st: os.stat_result) -> DirEntry:
    kind = _file_kind(st.st_mode)
    if kind != "dir":
        return DirEntry(name, kind)
    with fsutil.open_subdir(hosts_fd, name) as dir_fd:
        hst = fsutil.lstat_at(dir_fd, HOSTS_TOML)
        if hst is None:
            return DirEntry(name, "dir")
        file_kind = _file_kind(hst.st_mode)
        data = fsutil.read_at(dir_fd, HOSTS_TOML, MAX_HOSTS_TOML) if file_kind == "file" else None
        if data is not None and len(data) > MAX_HOSTS_TOML:  # read_at stops one byte past it
            return DirEntry(name, "dir", "too_large")
        return DirEntry(name, "dir", file_kind, data)


def scan(hosts_dir: Path, display: str, names: Iterable[str] | None = None) -> HostsSnapshot:
    """Every entry of the hosts dir (or only `names`), with each registry dir's hosts.toml contents."""
    try:
        with fsutil.open_dir(hosts_dir) as fd:
            wanted = os.listdir(fd) if names is None else list(dict.fromkeys(names))
            entries: dict[str, DirEntry] = {}
            for name in wanted:
                st = fsutil.lstat_at(fd, name)
                if st is not None:
                    try:
                        entries[name] = _read_entry(fd, name, st)
                    except OSError:  # a problem only when apply or remove needs this dir
                        entries[name] = DirEntry(name, "dir", "unreadable")
            return HostsSnapshot(display, True, entries)
    except FileNotFoundError:
        return HostsSnapshot(display, False)
    except OSError as e:
        raise fsutil.refuse_os_error(e, f"read hosts dir {display}") from e

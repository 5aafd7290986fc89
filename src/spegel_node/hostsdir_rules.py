"""containerd's hosts-dir rules, pure: how a registry names its dir, the lookup order, which dir
shadows which, and which dirs spegel-node manages (remotes/docker/config, HostDirFromRoot).

plan (what apply writes), validate (what containerd reads) and doctor (what is wrong) all ask
here; nothing here touches the node.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

DEFAULT_DIR = "_default"
HOSTS_TOML = "hosts.toml"
MAX_HOSTS_TOML = 4 << 20  # larger files are left alone, never read in part and written back
# containerd's own default config_path on Linux, since 2.2 (before it: none)
DEFAULT_CONFIG_PATH_SINCE = (2, 2, 0)
DEFAULT_CONFIG_PATH = ("/etc/containerd/certs.d", "/etc/docker/certs.d")

_PORT_DIR = re.compile(r"(.+)_(\d+)_")  # `host_port_`: how containerd spells `host:port` first
# a registry dir's name: host[:port], [IPv6][:port] or host_port_ (what containerd looks up)
_REGISTRY_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]*(:\d+|_\d+_)?|\[[0-9A-Fa-f:.]+\](:\d+)?")


def dir_names(host: str) -> tuple[str, ...]:
    """The dir names containerd tries for `host` (`host[:port]`), in order, before `_default`."""
    head, sep, port = host.rpartition(":")
    if sep and port.isdigit() and not host.endswith("]"):
        return (f"{head}_{port}_", host)
    return (host,)


def lookup_order(host: str | None) -> tuple[str, ...]:
    """Every dir containerd looks in for `host`, `_default` last (None: `_default` alone)."""
    return (DEFAULT_DIR,) if host is None else (*dir_names(host), DEFAULT_DIR)


def host_of_dir(name: str) -> str:
    """The `host[:port]` a registry dir stands for (`host_port_` -> `host:port`)."""
    m = _PORT_DIR.fullmatch(name)
    return f"{m.group(1)}:{m.group(2)}" if m else name


def shadowed_by(name: str) -> str | None:
    """The dir that `name` hides: `host:port` for `host_port_` (containerd reads the latter)."""
    m = _PORT_DIR.fullmatch(name)
    return f"{m.group(1)}:{m.group(2)}" if m else None


def is_registry_dir(name: str) -> bool:
    """Whether a hosts-dir entry names a registry (a README or lost+found does not)."""
    return not name.startswith(("_", ".")) and _REGISTRY_DIR.fullmatch(name) is not None


def dir_to_write(host: str, existing: Iterable[str]) -> str:
    """The dir containerd reads for `host`: the first existing in lookup order, else a new
    `host[:port]`."""
    present = set(existing)
    names = dir_names(host)
    return next((n for n in names if n in present), names[-1])


def first_existing(
    roots: Sequence[str], names: Sequence[str], exists: Callable[[str, str], bool]
) -> tuple[str, str] | None:
    """The (root, dir name) containerd reads: the first existing of `names`, root after root
    (an existing entry wins even when it is empty or broken)."""
    for root in roots:
        for name in names:
            if exists(root, name):
                return root, name
    return None


@dataclass(frozen=True)
class ManagedDir:
    """A dir spegel-node manages: the one containerd reads for `host` (`_default`: host None)."""

    dir_name: str
    host: str | None


def managed_dirs(hosts: Sequence[str], entries: Mapping[str, bool]) -> list[ManagedDir]:
    """The dirs to manage, given the registries' hosts and the hosts dir's entries (name -> is a
    dir or a link to one). With no registries: `_default` plus every registry dir already there,
    since those dirs would otherwise bypass `_default`."""
    if hosts:
        return [ManagedDir(dir_to_write(h, entries), h) for h in hosts]
    others = sorted(n for n, is_dir in entries.items() if is_dir and is_registry_dir(n))
    return [ManagedDir(DEFAULT_DIR, None)] + [ManagedDir(n, host_of_dir(n)) for n in others]

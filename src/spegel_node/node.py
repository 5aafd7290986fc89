"""Node paths: resolve paths of the node under --root, and report them without the root prefix."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class Node:
    """The node's filesystem as seen from here: `/` on the node itself, `/host` from a pod."""

    root: Path = Path("/")

    def path(self, node_path: str | PurePosixPath) -> Path:
        """Host path of a node path (absolute on the node), e.g. `/etc/x` -> `<root>/etc/x`.

        Under a root other than `/`, symlinks among the parent directories are followed as the
        node would follow them, inside the root: with `/etc/containerd -> /opt/ctr`,
        `/etc/containerd/config.toml` is `<root>/opt/ctr/config.toml`, never this machine's own
        `/opt/ctr/...` (and `..` stops at the root, as in a chroot). The last component is
        taken as is, so a caller can still see that it is a link (lstat semantics).
        """
        rel = str(node_path).strip("/")
        if not rel:
            return self.root
        if self.root == Path("/"):
            return self.root / rel
        *parents, last = rel.split("/")
        return self._resolve_in_root(parents) / last

    def real_path(self, node_path: str | PurePosixPath) -> Path:
        """Like `path`, also following the last component: for a directory to work in, such as
        a hosts dir that is itself a link (`/etc/containerd/certs.d -> /var/lib/x`)."""
        rel = str(node_path).strip("/")
        if not rel or self.root == Path("/"):
            return self.path(node_path)
        return self._resolve_in_root(rel.split("/"))

    def _resolve_in_root(self, parts: list[str]) -> Path:
        done: list[str] = []
        pending = parts
        for _ in range(_MAX_LINK_HOPS):
            link_found = False
            while pending:
                part, pending = pending[0], pending[1:]
                if part in ("", "."):
                    continue
                if part == "..":
                    done = done[:-1]
                    continue
                candidate = self.root.joinpath(*done, part)
                try:
                    target = os.readlink(candidate)
                except OSError:  # not a link, or absent: take it literally
                    done.append(part)
                    continue
                if target.startswith("/"):
                    done = []
                pending = target.split("/") + pending
                link_found = True
                break
            if not link_found:
                return self.root.joinpath(*done)
        raise OSError(
            errno.ELOOP, "too many levels of symbolic links", str(self.root / "/".join(parts))
        )

    def display(self, host_path: str | Path) -> str:
        """Node path of a host path under the root, for reports; other paths are returned as is."""
        p = Path(host_path)
        if self.root == Path("/"):
            return str(p)
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            return str(p)
        return "/" + str(rel) if str(rel) != "." else "/"

    @property
    def is_live(self) -> bool:
        """True when the root is this machine's own `/` (running processes may be inspected)."""
        return self.root.resolve() == Path("/")


_MAX_LINK_HOPS = 40  # as the kernel (MAXSYMLINKS)
STATE_DIR = "/var/lib/spegel-node"
DEFAULT_SETTINGS_PATH = "/etc/spegel-node/config.toml"

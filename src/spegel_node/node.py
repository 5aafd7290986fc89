"""Node paths: resolve paths of the node under --root, and report them without the root prefix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class Node:
    """The node's filesystem as seen from here: `/` on the node itself, `/host` from a pod."""

    root: Path = Path("/")

    def path(self, node_path: str | PurePosixPath) -> Path:
        """Host path of a node path (absolute on the node), e.g. `/etc/x` -> `<root>/etc/x`."""
        rel = str(node_path).lstrip("/")
        return self.root / rel if rel else self.root

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


STATE_DIR = "/var/lib/spegel-node"
DEFAULT_CONFIG = "/etc/spegel-node/config.toml"

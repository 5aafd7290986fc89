"""Where the Go test peers that `make peers` builds (tests/peers/build.py) live.

A test that needs a peer asks for it here; a missing peer is a test failure that names the
`make peers` step, never a skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from peers.build import CACHE, CONTAINERD_VERSIONS, PEERS

__all__ = ["CONTAINERD_VERSIONS", "peer_bin"]


def peer_bin(name: str, binary: str | None = None, version: str | None = None) -> Path:
    """The path of ``binary`` (default: ``name``) of peer ``name`` at ``version`` (default: the
    only or newest pinned one)."""
    candidates = [p for p in PEERS if p.name == name and (version is None or p.version == version)]
    if not candidates:
        pytest.fail(f"no pinned test peer {name} {version or ''} in tests/peers/build.py")
    peer = candidates[-1]
    path = CACHE / f"{peer.name}-{peer.version}" / "bin" / (binary or name)
    if not (path.parent.parent / ".built").is_file() or not path.is_file():
        pytest.fail(f"test peer {peer.name} {peer.version} is not built ({path}): run `make peers`")
    return path

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spegel_node.node import Node


def test_absolute_symlinks_resolve_inside_the_root(tmp_path: Path) -> None:
    # /etc/containerd/certs.d -> /var/lib/certs on the node must mean <root>/var/lib/certs,
    # not this machine's /var/lib/certs (the agent runs in a pod with the host at /host).
    (tmp_path / "var/lib/certs").mkdir(parents=True)
    (tmp_path / "etc/containerd").mkdir(parents=True)
    (tmp_path / "etc/containerd/certs.d").symlink_to("/var/lib/certs")
    node = Node(tmp_path)
    assert node.real_path("/etc/containerd/certs.d") == tmp_path / "var/lib/certs"
    assert node.path("/etc/containerd/certs.d/ghcr.io") == tmp_path / "var/lib/certs/ghcr.io"
    assert node.path("/etc/containerd/certs.d") == tmp_path / "etc/containerd/certs.d"  # lstat


def test_relative_links_and_dotdot_stay_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "a/up").symlink_to("../../../../etc")
    (tmp_path / "a/rel").symlink_to("b")
    node = Node(tmp_path)
    assert node.path("/a/rel/x") == tmp_path / "a/b/x"
    assert node.path("/a/up/passwd") == tmp_path / "etc/passwd"  # clamped at the root


def test_symlink_loops_are_an_os_error(tmp_path: Path) -> None:
    os.symlink("/loop", tmp_path / "loop")
    with pytest.raises(OSError):
        Node(tmp_path).path("/loop/x")


def test_live_root_is_left_to_the_kernel() -> None:
    assert Node(Path("/")).path("/etc/hostname") == Path("/etc/hostname")

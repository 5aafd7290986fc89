"""Helpers for the reliability suite: fake plain-containerd nodes, the real console script,
private mount namespaces (read-only bind mounts, tiny tmpfs), and what to look for afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from spegel_node import hostsdir
from spegel_node.fsutil import TMP_PREFIX
from spegel_node.plan import HostsSnapshot
from support.fake_nodes import make_containerd, write

HOSTS = "/etc/containerd/certs.d"
STATE = "/var/lib/spegel-node"
CONFIG = "/etc/spegel-node/config.toml"
REGISTRIES = (
    "https://docker.io",
    "https://ghcr.io",
    "https://quay.io",
    "https://gcr.io",
    "https://registry.k8s.io",
    "http://127.0.0.1:5000",
)
# The console script installed in the venv the tests run from (`pip install -e .`).
SPEGEL_NODE = Path(sys.executable).with_name("spegel-node")

SECRET_FILE = """\
# Our pull-through cache for ghcr (ticket OPS-42)
server = "https://ghcr.io"

[host."https://cache.example.com"]
  capabilities = ["pull", "resolve"]
  [host."https://cache.example.com".header]
    Authorization = "Bearer s3cr3t-t0ken"
    X-Api-Key = ["k3y-0ne", "k3y-tw0"]
"""


def make_node(
    root: Path, registries: Sequence[str] = REGISTRIES, extra_config: str = "", config: bool = True
) -> Path:
    """A plain-containerd node (config_path = HOSTS) with a spegel-node config file; `root`."""
    make_containerd(root, config_path=HOSTS)
    if config:
        listed = ", ".join(f'"{r}"' for r in registries)
        write(root, CONFIG, f'registries = [{listed}]\nnode_ip = "10.0.0.5"\n{extra_config}')
    return root


def hosts(root: Path) -> Path:
    return root / HOSTS.lstrip("/")


def state_dir(root: Path) -> Path:
    return root / STATE.lstrip("/")


def hosts_files(root: Path) -> dict[str, bytes]:
    """Every `<dir>/hosts.toml` under the hosts dir (regular files only), by `<dir>`."""
    found: dict[str, bytes] = {}
    base = hosts(root)
    if not base.is_dir():
        return found
    for d in sorted(base.iterdir()):
        f = d / "hosts.toml"
        if d.is_dir() and not d.is_symlink() and f.is_file() and not f.is_symlink():
            with contextlib.suppress(FileNotFoundError):  # polled while a run deletes it
                found[d.name] = f.read_bytes()
    return found


def temp_files(root: Path) -> list[Path]:
    """spegel-node temp files anywhere under root."""
    return [p for p in root.rglob(f"{TMP_PREFIX}*")]


def need_console_script() -> None:
    if not SPEGEL_NODE.exists():
        pytest.skip(f"{SPEGEL_NODE} not installed (make installs it)")


def console(
    root: Path, *args: str, timeout: float = 60, umask: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script against the node root; text output captured."""
    need_console_script()
    return subprocess.run(
        [str(SPEGEL_NODE), *args, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def need_mount_namespaces() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (private mount namespaces)")
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare and mount (util-linux)")


def in_private_mount_ns(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a bash script in a new private mount namespace: its mounts vanish when it exits."""
    need_mount_namespaces()
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-euo",
            "pipefail",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line_error(stderr: str) -> str:
    """The single stderr line of a refused or bad-input run (asserts there is exactly one)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("spegel-node: error: "), stderr
    return lines[0]


def after_scan(monkeypatch: pytest.MonkeyPatch, action: Callable[[Path], None]) -> None:
    """Run `action(hosts_dir)` right after apply reads the hosts dir and before it writes: what
    a k3s restart, a person or an attacker does while apply runs. `monkeypatch.undo()` ends it."""
    real_scan = hostsdir.scan

    def scan_then_act(path: Path, display: str) -> HostsSnapshot:
        snapshot = real_scan(path, display)
        action(path)
        return snapshot

    monkeypatch.setattr(hostsdir, "scan", scan_then_act)

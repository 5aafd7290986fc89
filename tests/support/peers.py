"""Where the Go test peers that `make peers` builds (tests/peers/build.py) live.

A test that needs a peer asks for it here; a missing peer is a test failure that names the
`make peers` step, never a skip.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from peers.build import CACHE, CONTAINERD_VERSIONS, PEERS, module_download

__all__ = ["CONTAINERD_VERSIONS", "helm_template", "peer_bin", "spegel_module"]


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


@functools.lru_cache(maxsize=1)
def spegel_module() -> Path:
    """The source of the pinned Spegel peer's Go module (its chart is `charts/spegel`, its
    metrics `pkg/metrics`), from the module proxy's cache."""
    (peer,) = [p for p in PEERS if p.name == "spegel"]
    return Path(module_download(peer.in_module, peer.version)["Dir"])


def helm_template(
    chart: Path, values: dict[str, Any], tmp_path: Path, *args: str
) -> list[dict[str, Any]]:
    """The documents `helm template` (the helm peer) renders from `chart` with `values`."""
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(values))
    proc = subprocess.run(
        [str(peer_bin("helm")), "template", "spegel", str(chart), "-f", str(values_file), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]

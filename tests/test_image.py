"""The container image (`make image`) for real: built twice with the same digest, imported into a
real containerd (Debian's 1.6.20), run with Debian's runc with a fake host tree at /host, where
`apply` and `doctor` do their job through `--root /host`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fake_nodes import make_containerd
from support.sandbox import ContainerdProc

pytestmark = pytest.mark.sandbox
REPO = Path(__file__).resolve().parents[1]
NAME = "localhost/spegel-node:test"


def _build(out: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/build_image.py"), "--out", str(out), "--name", NAME],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r"manifest (sha256:[0-9a-f]{64})", done.stdout)
    assert match, done.stdout
    return match.group(1)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    base = tmp_path_factory.mktemp("image")
    first, second = base / "a.tar", base / "b.tar"
    return first, _build(first), _build(second)


def test_two_builds_give_the_same_manifest_digest(image: tuple[Path, str, str]) -> None:
    _, first, second = image
    assert first == second


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[ContainerdProc]:
    (tmp_path / "hosts").mkdir()
    proc = ContainerdProc(tmp_path / "ctd", tmp_path / "hosts")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_imported_and_run_it_applies_and_diagnoses_the_host_tree(
    image: tuple[Path, str, str], containerd: ContainerdProc, tmp_path: Path
) -> None:
    archive, digest, _ = image
    ctr = ["ctr", "-a", str(containerd.socket), "-n", "sandbox"]
    imported = subprocess.run(
        [*ctr, "images", "import", str(archive)], capture_output=True, text=True, timeout=120
    )
    assert imported.returncode == 0 and digest in imported.stdout, imported.stderr
    root = tmp_path / "node"
    make_containerd(root, config_path="/etc/containerd/certs.d")
    (root / "etc/spegel-node").mkdir(parents=True)
    (root / "etc/spegel-node/config.toml").write_text(
        'node_ip = "127.0.0.1"\nregistries = ["https://docker.io"]\n'
    )
    mount = f"type=bind,src={root},dst=/host,options=rbind:rw"

    def run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*ctr, "run", "--rm", "--mount", mount, NAME, name, "/usr/bin/spegel-node", *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    applied = run("apply", "--root", "/host", "apply", "--no-gate")
    assert applied.returncode == 0, applied.stderr
    hosts = root / "etc/containerd/certs.d/docker.io/hosts.toml"
    assert hosts.read_text().startswith("# managed by spegel-node")
    assert '[host."http://127.0.0.1:29999"]' in hosts.read_text()
    doctor = run("doctor", "doctor", "--root", "/host", "-o", "json")
    assert doctor.returncode in (0, 1), doctor.stderr
    checks = {c["id"]: c["status"] for c in json.loads(doctor.stdout)["checks"]}
    assert checks["layout.detected"] == "pass" and checks["hosts.docker.io"] == "pass"

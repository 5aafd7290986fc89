"""`make wheelhouse ARCH=...` (scripts/wheelhouse.py): per-architecture wheelhouses for the role.

The aarch64 one is built for real from PyPI on this x86_64 machine and judged here by its file
names and metadata (this test parses the tags itself, not with the script's code). The x86_64 one
is installed offline, for real, into venvs of Debian's Python 3.9 (bullseye) and 3.13 (trixie)
in the pyversions trees, and its `spegel-node` run there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import pyvers

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "wheelhouse.py"


def make_wheelhouse(arch: str, dest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", arch, "--dest", str(dest), *extra],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def platform_tags(wheel: str) -> set[str]:
    return set(wheel.removesuffix(".whl").split("-")[-1].split("."))


def requires_dist(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(meta).decode()
    return [
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


@pytest.fixture(scope="module")
def aarch64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("wheelhouse") / "aarch64"
    proc = make_wheelhouse("aarch64", dest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest


def test_aarch64_wheelhouse_holds_only_aarch64_or_pure_wheels(aarch64: Path) -> None:
    wheels = sorted(p.name for p in aarch64.glob("*.whl"))
    binary = [w for w in wheels if platform_tags(w) != {"any"}]
    assert binary, wheels  # psutil has C code: there is something to judge
    for wheel in wheels:
        tags = platform_tags(wheel)
        assert tags == {"any"} or all(t.endswith("_aarch64") for t in tags), wheel
        if tags == {"any"}:
            assert "-none-any" in wheel, wheel


def test_aarch64_wheelhouse_covers_every_runtime_dependency_on_3_9_and_3_13(aarch64: Path) -> None:
    names = {w.name.split("-")[0].lower(): w for w in aarch64.glob("*.whl")}
    versions = {
        w.name.split("-")[0].lower() + "-" + w.name.split("-")[1] for w in aarch64.glob("*.whl")
    }
    (own,) = aarch64.glob("spegel_node-*-py3-none-any.whl")
    for req in requires_dist(own):
        if "extra ==" in req:
            continue  # the dev extra: not installed on nodes
        name = req.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip()
        assert name.lower().replace("-", "_") in names, req
    # the version-dependent ones, both sides
    assert any(v.startswith("typer-0.23.") for v in versions), versions  # 3.9
    assert any(v.startswith(("typer-0.27.", "typer-0.28.")) for v in versions), versions  # 3.10+
    assert "tomli" in names and "click" in names  # typer 0.23 and 3.9/3.10 only
    assert {"psutil", "rich", "h2", "hpack", "hyperframe", "tomlkit"} <= set(names)
    # the script's own offline check agrees, and it fails on a foreign wheel
    assert make_wheelhouse("aarch64", aarch64, "--check").returncode == 0


def test_a_foreign_wheel_fails_the_check(aarch64: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(aarch64, mixed)
    (psutil,) = mixed.glob("psutil-*.whl")
    psutil.rename(mixed / psutil.name.replace("aarch64", "x86_64"))
    proc = make_wheelhouse("aarch64", mixed, "--check")
    assert proc.returncode == 1
    assert "not aarch64 or pure: psutil-" in proc.stderr
    (mixed / next(p.name for p in mixed.glob("tomli-*.whl"))).unlink()
    proc = make_wheelhouse("aarch64", mixed, "--check")  # and a missing dependency
    assert "no wheel for tomli" in proc.stderr and "Python 3.9" in proc.stderr


@pytest.mark.pyversions
@pytest.mark.parametrize("suite", sorted(pyvers.SUITES))
def test_x86_64_wheelhouse_installs_offline_on_debian_python(suite: str, tmp_path: Path) -> None:
    reason = pyvers.unavailable_reason()
    if reason:
        pytest.skip(reason)
    tree = pyvers.ensure_tree(suite)
    with pyvers.tree_lock(tree):
        dest = tree / "var" / "tmp" / "spegel-node-wheelhouse"
        shutil.rmtree(dest, ignore_errors=True)
        proc = make_wheelhouse("x86_64", dest)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        venv = "/var/tmp/spegel-node-wheelhouse-venv"
        shutil.rmtree(tree / venv.lstrip("/"), ignore_errors=True)
        try:
            pyvers.run_in_tree(tree, ["python3", "-m", "venv", venv])
            pyvers.run_in_tree(
                tree,
                [f"{venv}/bin/pip", "install", "-q", "--no-index", "--find-links",
                 "/var/tmp/spegel-node-wheelhouse", "spegel-node"],
            )  # fmt: skip
            out = pyvers.run_in_tree(tree, [f"{venv}/bin/spegel-node", "--version", "-o", "json"])
            assert f'"python": "{pyvers.SUITES[suite]}.' in out.stdout, out.stdout
        finally:
            shutil.rmtree(tree / venv.lstrip("/"), ignore_errors=True)
            shutil.rmtree(dest, ignore_errors=True)

"""The package on the oldest and newest Python of Debian's packages: 3.9 (bullseye), 3.13 (trixie).

Each run installs the wheel built from this tree (no ``src`` on the path) into a venv in a cached
debootstrap tree (tests/support/pyvers.py) that holds the runtime dependencies and pytest from
PyPI, then: imports every module of the package, runs the CLI on a fake node, and runs the unit
tests in ``UNIT_TESTS`` (files that need no containerd, nspawn node or Go peer).

The tests themselves use ``import tomllib``; on 3.9 they get a test-only ``tomllib`` module that
re-exports tomli, put on the path of the pytest run alone. The import and CLI checks run without
it, and ruff's banned-api rule keeps ``tomllib`` out of ``src`` (compat.py aside).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from support import pyvers

from spegel_node.compat import tomllib

pytestmark = pytest.mark.pyversions

REPO = Path(__file__).resolve().parents[1]
UNIT_TESTS = (
    "test_apply.py",
    "test_cli_help.py",
    "test_cli_operators.py",
    "test_doctor_parts.py",
    "test_flavors.py",
    "test_flux.py",
    "test_fsutil.py",
    "test_gate.py",
    "test_hoststoml.py",
    "test_httpprobe.py",
    "test_layout.py",
    "test_lifecycle.py",
    "test_node.py",
    "test_registry.py",
    "test_reliability_faults.py",
    "test_reliability_hostile_fs.py",
    "test_reliability_input.py",
    "test_reliability_kill.py",
    "test_reliability_secrets.py",
    "test_run.py",
    "test_settings.py",
    "test_units.py",
    "test_validate.py",
    "test_validate_cli.py",
)
COPIED = ("tests", "systemd", "docs", "ansible")
TEST_REQUIREMENTS = ("pytest>=8", "hypothesis>=6.100", "pyyaml>=6")
WORK = "/var/tmp/spegel-node-pyvers"

CONTAINERD_CONFIG = """\
version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
"""
HOSTS_TOML = """\
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:30020"]
  capabilities = ["pull", "resolve"]
"""
IMPORT_ALL = """\
import importlib, pkgutil, sys, spegel_node
assert "site-packages" in spegel_node.__file__, spegel_node.__file__
names = [m.name for m in pkgutil.walk_packages(spegel_node.__path__, "spegel_node.")
         if m.name != "spegel_node.__main__"]
for name in names:
    importlib.import_module(name)
print(sys.version_info[0], sys.version_info[1], len(names))
"""


def _requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *TEST_REQUIREMENTS]


@pytest.mark.parametrize("suite", sorted(pyvers.SUITES))
def test_unit_tests_pass_on_debian_python(
    suite: str, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    reason = pyvers.unavailable_reason()
    if reason:
        pytest.skip(reason)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    tree = pyvers.ensure_tree(suite)
    timings["tree"] = time.monotonic() - t0
    venv = pyvers.ensure_venv(tree, _requirements())
    timings["venv"] = time.monotonic() - t0 - timings["tree"]
    wheel = pyvers.build_own_wheel(REPO, tmp_path / "dist")

    with pyvers.tree_lock(tree):  # one run at a time per tree: the wheel goes into its venv
        work = tree / WORK.lstrip("/")
        shutil.rmtree(work, ignore_errors=True)
        (work / "shim").mkdir(parents=True)
        shutil.copy2(wheel, work / wheel.name)
        shutil.copy2(REPO / "pyproject.toml", work / "pyproject.toml")
        for part in COPIED:  # what the tests read from the repo; not src: the wheel is tested
            shutil.copytree(REPO / part, work / part, ignore=shutil.ignore_patterns("__pycache__"))
        (work / "shim" / "tomllib.py").write_text("from tomli import *  # noqa: F403\n")
        pip = [f"{venv}/bin/pip", "install", "-q", "--no-deps", "--force-reinstall"]
        pyvers.run_in_tree(tree, [*pip, f"{WORK}/{wheel.name}"])

        # The product alone (no test shim): every module imports, the CLI works.
        out = pyvers.run_in_tree(tree, [f"{venv}/bin/python", "-c", IMPORT_ALL]).stdout.split()
        assert f"{out[0]}.{out[1]}" == pyvers.SUITES[suite]
        assert int(out[2]) > 40  # modules imported
        version = pyvers.run_in_tree(tree, [f"{venv}/bin/spegel-node", "--version"]).stdout
        assert version.strip() == "spegel-node 0.1.0"
        fake = f"{WORK}/node"
        etc = tree / fake.lstrip("/") / "etc" / "containerd"
        (etc / "certs.d" / "docker.io").mkdir(parents=True)
        (etc / "config.toml").write_text(CONTAINERD_CONFIG)
        (etc / "certs.d" / "docker.io" / "hosts.toml").write_text(HOSTS_TOML)
        for argv, want in ((["detect"], '"hosts_dir"'), (["validate"], '"ok"')):
            proc = pyvers.run_in_tree(
                tree, [f"{venv}/bin/spegel-node", *argv, "--root", fake, "-o", "json"], check=False
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert want in proc.stdout, proc.stdout

        t1 = time.monotonic()
        old = tuple(map(int, pyvers.SUITES[suite].split("."))) < (3, 11)
        # 2000 random lifecycle sequences take two minutes here; the host run has them all
        env = {"LIFECYCLE_EXAMPLES": "100", **({"PYTHONPATH": f"{WORK}/shim"} if old else {})}
        tests = [f"{WORK}/tests/{name}" for name in UNIT_TESTS]
        proc = pyvers.run_in_tree(
            tree,
            [f"{venv}/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--rootdir", WORK, "-c", f"{WORK}/pyproject.toml", "--basetemp", f"{WORK}/tmp",
             *tests],
            env=env, timeout=900, check=False,
        )  # fmt: skip
        timings["pytest"] = time.monotonic() - t1
        shutil.rmtree(work, ignore_errors=True)
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    print(f"pyversions {suite} ({pyvers.SUITES[suite]}): {tail.splitlines()[-1:]} {timings}")
    for key, value in timings.items():
        record_property(f"{suite}_{key}_s", round(value, 1))
    assert proc.returncode == 0, f"{tail}\n{proc.stderr[-2000:]}"
    assert " passed" in tail and " failed" not in tail and " error" not in tail

"""The role's preflight on the node's Python and its choice of wheelhouse by architecture.

The preflight tasks run for real with ansible-playbook on localhost. What differs per node is
stood in for: its `python3` is a script on PATH that prints a chosen version (what the probe
prints), and its facts (architecture, service manager: this machine's PID 1 is no systemd) come
from a module beside the playbook that returns them as facts, as setup would.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import pyvers
from test_ansible_role import ROLE, ansible_env, need

PLAYBOOK = [
    {
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "tasks": [
            {"name": "Node facts", "node_facts": {}},
            {
                "ansible.builtin.include_role": {
                    "name": "spegel_node",
                    "tasks_from": "preflight",
                    "public": True,
                }
            },
            {"ansible.builtin.debug": {"msg": "wheelhouse={{ _spegel_node_arch_wheelhouse }}"}},
        ],
    }
]

FACTS_MODULE = """\
#!/usr/bin/python
import json
facts = {{"architecture": "{arch}", "service_mgr": "systemd"}}
print(json.dumps({{"changed": False, "ansible_facts": facts}}))
"""
SERVICE_MGR_MODULE = """\
#!/usr/bin/python
import json
print(json.dumps({"changed": False, "ansible_facts": {"service_mgr": "systemd"}}))
"""


def run_preflight(
    tmp_path: Path, python_version: str, arch: str, arches: tuple[str, ...] = ("x86_64",)
) -> subprocess.CompletedProcess[str]:
    playbook = need("ansible-playbook")
    fake = tmp_path / "fake-bin"
    fake.mkdir(exist_ok=True)
    python3 = fake / "python3"
    python3.write_text(f"#!/bin/sh\necho {python_version}\n")
    python3.chmod(0o755)
    wheelhouse = tmp_path / "wheelhouse"
    for name in arches:
        (wheelhouse / name).mkdir(parents=True, exist_ok=True)
        (wheelhouse / name / "spegel_node-0.1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "library").mkdir(exist_ok=True)
    (tmp_path / "library" / "node_facts.py").write_text(FACTS_MODULE.format(arch=arch))
    path = tmp_path / "preflight.yml"
    path.write_text(yaml.safe_dump(PLAYBOOK))
    env = ansible_env(tmp_path)
    env["PATH"] = f"{fake}:{env['PATH']}"
    env["ANSIBLE_ROLES_PATH"] = str(ROLE.parent)
    return subprocess.run(
        [str(playbook), "-i", "localhost,", str(path),
         "-e", f"ansible_python_interpreter={sys.executable}",
         "-e", f"spegel_node_wheelhouse={wheelhouse}"],
        capture_output=True, text=True, timeout=180, check=False, env=env,
    )  # fmt: skip


def test_preflight_refuses_python_older_than_3_9_and_names_the_fix(tmp_path: Path) -> None:
    proc = run_preflight(tmp_path, "3.8.10", "x86_64")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "has Python 3.8.10 as python3; spegel-node needs 3.9 or later" in out
    assert "Install python3 >= 3.9" in out and "Talos" in out and "docs/image.md" in out


def test_preflight_accepts_3_9_and_picks_the_wheelhouse_of_the_node_architecture(
    tmp_path: Path,
) -> None:
    proc = run_preflight(tmp_path, "3.9.2", "aarch64", arches=("x86_64", "aarch64"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wheelhouse={tmp_path / 'wheelhouse' / 'aarch64'}" in proc.stdout
    proc = run_preflight(tmp_path, "3.13.5", "x86_64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wheelhouse={tmp_path / 'wheelhouse' / 'x86_64'}" in proc.stdout


def test_preflight_names_make_wheelhouse_when_the_architecture_has_none(tmp_path: Path) -> None:
    proc = run_preflight(tmp_path, "3.11.2", "aarch64", arches=("x86_64",))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "for this aarch64 node" in out and "make wheelhouse ARCH=aarch64" in out


def test_a_flat_wheelhouse_still_works_for_one_architecture(tmp_path: Path) -> None:
    flat = tmp_path / "wheelhouse"
    flat.mkdir()
    (flat / "spegel_node-0.1.0-py3-none-any.whl").write_bytes(b"")
    proc = run_preflight(tmp_path, "3.11.2", "x86_64", arches=())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wheelhouse={flat}" in proc.stdout
    assert os.path.isdir(flat)


@pytest.mark.pyversions
@pytest.mark.parametrize("suite", sorted(pyvers.SUITES))
def test_preflight_on_debian_trees_with_their_own_python(suite: str, tmp_path: Path) -> None:
    """The preflight over Ansible's chroot connection into the pyversions trees: the modules
    run on the tree's own python3 (3.9, 3.13), the architecture fact is real; only the service
    manager is stood in for (nothing runs in a chroot)."""
    playbook = need("ansible-playbook")
    reason = pyvers.unavailable_reason()
    if reason:
        pytest.skip(reason)
    tree = pyvers.ensure_tree(suite)
    wheelhouse = tmp_path / "wheelhouse" / platform.machine()
    wheelhouse.mkdir(parents=True)
    (wheelhouse / "spegel_node-0.1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "node_facts.py").write_text(SERVICE_MGR_MODULE)
    play = [
        {
            "hosts": "all",
            "gather_facts": False,
            "tasks": [
                {"ansible.builtin.setup": {"gather_subset": ["!all", "platform"]}},
                {"name": "Service manager", "node_facts": {}},
                {"ansible.builtin.include_role": {"name": "spegel_node", "tasks_from": "preflight", "public": True}},
                {"ansible.builtin.debug": {"msg": "wheelhouse={{ _spegel_node_arch_wheelhouse }} python={{ _spegel_node_python_probe.stdout }}"}},
            ],
        }
    ]  # fmt: skip
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    (tmp_path / "inventory.ini").write_text(
        f"{suite} ansible_connection=community.general.chroot ansible_host={tree} "
        "ansible_python_interpreter=/usr/bin/python3\n"
    )
    env = ansible_env(tmp_path)
    env["ANSIBLE_ROLES_PATH"] = str(ROLE.parent)
    proc = subprocess.run(
        [str(playbook), "-i", str(tmp_path / "inventory.ini"), str(tmp_path / "play.yml"),
         "-e", f"spegel_node_wheelhouse={tmp_path / 'wheelhouse'}"],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"wheelhouse={wheelhouse} python={pyvers.SUITES[suite]}." in proc.stdout

"""The doctor and remove playbooks and the collection, without nodes (fast).

doctor.yml runs here against local "nodes" whose spegel-node is a script printing canned
doctor JSON; the real nodes (rollout, doctor.yml, remove.yml, the built collection) are in
tests/test_ansible_nspawn.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import nspawn
from test_ansible_nspawn import fleet_summary, parse_recap
from test_ansible_role import ansible_env, need

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "ansible"
ROLE = ANSIBLE / "roles" / "spegel_node"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def fake_node(tmp: Path, name: str, doctor: dict[str, Any] | None, rc: int) -> Path:
    """A venv dir whose bin/spegel-node records its argv and prints `doctor` as JSON."""
    venv = tmp / name
    if doctor is None:  # not installed
        return venv
    (venv / "bin").mkdir(parents=True)
    (venv / "doctor.json").write_text(json.dumps({"schema": "spegel-node/v1", **doctor}))
    script = venv / "bin" / "spegel-node"
    script.write_text(f'#!/bin/sh\necho "$@" > {venv}/argv\ncat {venv}/doctor.json\nexit {rc}\n')
    script.chmod(0o755)
    return venv


def checks(*specs: tuple[str, str, bool]) -> list[dict[str, Any]]:
    return [{"id": i, "status": s, "ignored": ign, "summary": "..."} for i, s, ign in specs]


def run_doctor_playbook(
    tmp_path: Path, nodes: dict[str, Path], *extra: str
) -> subprocess.CompletedProcess[str]:
    playbook = need("ansible-playbook")
    lines = ["[spegel_nodes]"] + [f"{name} spegel_node_venv={venv}" for name, venv in nodes.items()]
    lines += [
        "[spegel_nodes:vars]",
        "ansible_connection=local",
        f"ansible_python_interpreter={sys.executable}",
        "ansible_become=false",
    ]
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("\n".join(lines) + "\n")
    env = ansible_env(tmp_path) | {"ANSIBLE_STDOUT_CALLBACK": "default"}
    return subprocess.run(
        [str(playbook), "-i", str(inventory), *extra, str(ANSIBLE / "playbooks" / "doctor.yml")],
        capture_output=True, text=True, timeout=180, check=False, env=env,
    )  # fmt: skip


def test_doctor_playbook_summarises_every_node_and_changes_nothing(tmp_path: Path) -> None:
    nodes = {
        "node-a": fake_node(
            tmp_path,
            "a",
            {
                "ok": False,
                "flavor": "k3s",
                "checks": checks(
                    ("spegel.v2", "fail", False),
                    ("agent.timer", "warn", False),
                    ("hosts.docker.io", "pass", False),
                ),
            },
            1,
        ),
        "node-bee": fake_node(
            tmp_path,
            "b",
            {
                "ok": True,
                "flavor": "containerd",
                "checks": checks(
                    ("spegel.v2", "fail", True),
                    ("agent.timer", "warn", False),
                    ("agent.gate", "warn", False),
                ),
            },
            0,
        ),
        "node-c": fake_node(tmp_path, "c", None, 0),
    }
    proc = run_doctor_playbook(
        tmp_path, nodes, "-e", json.dumps({"spegel_node_doctor_ignore": ["spegel.*", "agent.x"]})
    )
    out = proc.stdout + proc.stderr
    # A failed check (node-a) and a node without spegel-node (node-c) fail the play, after
    # the summary; nothing changed anywhere.
    assert proc.returncode == 2, out[-4000:]
    recap = parse_recap(proc.stdout)
    assert set(recap) == set(nodes)
    assert all(counts["changed"] == 0 for counts in recap.values()), recap
    assert out.count("TASK [Summarise the fleet]") == 1
    lines = fleet_summary(proc.stdout)
    assert [line.split() for line in lines] == [
        ["node", "flavor", "failed", "warned", "ignored"],
        ["node-a", "k3s", "spegel.v2", "agent.timer", "-"],
        ["node-bee", "containerd", "-", "agent.timer,agent.gate", "spegel.v2"],
        ["node-c", "-", "not", "installed", "(no", f"{nodes['node-c']}/bin/spegel-node)", "-", "-"],
        [],
        ["check", "failed", "warned"],
        ["agent.gate", "0", "1"],
        ["agent.timer", "0", "2"],
        ["spegel.v2", "1", "0"],
    ]
    # the columns line up
    assert lines[0].index("flavor") == lines[2].index("containerd") == len("node-bee  ")
    assert "node-a: spegel.v2 failed" in out and "node-c: not installed" in out
    # the ignore list reaches doctor as --ignore, one per pattern
    argv = (nodes["node-a"] / "argv").read_text().split()
    assert argv == ["doctor", "--output", "json", "--ignore=spegel.*", "--ignore=agent.x"]


def test_doctor_playbook_passes_on_a_healthy_fleet(tmp_path: Path) -> None:
    healthy = {"ok": True, "flavor": "containerd", "checks": checks(("spegel.v2", "pass", False))}
    nodes = {f"node-{i}": fake_node(tmp_path, str(i), healthy, 0) for i in range(2)}
    proc = run_doctor_playbook(tmp_path, nodes)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert fleet_summary(proc.stdout)[-1] == "(no check failed or warned on any node)"
    assert all(c["changed"] == 0 and c["failed"] == 0 for c in parse_recap(proc.stdout).values())


@pytest.mark.parametrize("name", ["doctor.yml", "remove.yml"])
def test_playbook_syntax_check(tmp_path: Path, name: str) -> None:
    playbook = need("ansible-playbook")
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[spegel_nodes]\nnode1\n")
    proc = subprocess.run(
        [str(playbook), "--syntax-check", "-i", str(inventory), str(ANSIBLE / "playbooks" / name)],
        capture_output=True, text=True, timeout=120, check=False, env=ansible_env(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_doctor_ignore_variable_is_passed_to_doctor() -> None:
    defaults = load(ROLE / "defaults" / "main.yml")
    assert defaults["spegel_node_doctor_ignore"] == []
    spec = load(ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert spec["spegel_node_doctor_ignore"]["type"] == "list"
    verify = (ROLE / "tasks" / "verify.yml").read_text()
    assert "spegel_node_doctor_ignore" in verify and "--ignore=" in verify
    rollout = (REPO / "docs" / "rollout.md").read_text()
    assert 'spegel_node_doctor_ignore: ["spegel.v2"]' in rollout


def test_platforms_are_what_the_tests_run() -> None:
    meta = load(ROLE / "meta" / "main.yml")["galaxy_info"]
    assert meta["platforms"] == [{"name": "Debian", "versions": [nspawn.SUITE]}]


def test_galaxy_metadata_follows_pyproject() -> None:
    galaxy = load(ANSIBLE / "galaxy.yml")
    assert galaxy["version"] == PYPROJECT["version"]
    assert galaxy["license"] == [PYPROJECT["license"]]
    assert (galaxy["namespace"], galaxy["name"]) == ("spegel_node", "spegel_node")
    assert (ANSIBLE / galaxy["readme"]).is_file()


def build_collection(tmp_path: Path) -> Path:
    galaxy = need("ansible-galaxy")
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [str(galaxy), "collection", "build", str(ANSIBLE), "--output-path", str(dist)],
        capture_output=True, text=True, timeout=120, check=False, env=ansible_env(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tarball,) = dist.glob("*.tar.gz")
    assert tarball.name == f"spegel_node-spegel_node-{PYPROJECT['version']}.tar.gz"
    return tarball


def test_collection_builds_and_installs(tmp_path: Path) -> None:
    tarball = build_collection(tmp_path)
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"roles/spegel_node/tasks/main.yml", "roles/spegel_node/tasks/remove.yml"} <= names
    assert {"playbooks/rollout.yml", "playbooks/doctor.yml", "playbooks/remove.yml"} <= names
    assert not any(n.startswith(("wheelhouse", "playbooks/roles")) for n in names), names
    dest = tmp_path / "collections"
    proc = subprocess.run(
        [str(need("ansible-galaxy")), "collection", "install", "-p", str(dest), str(tarball)],
        capture_output=True, text=True, timeout=120, check=False, env=ansible_env(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = dest / "ansible_collections" / "spegel_node" / "spegel_node"
    assert (installed / "roles" / "spegel_node" / "meta" / "argument_specs.yml").is_file()
    # the role is found by its FQCN
    proc = subprocess.run(
        [str(need("ansible-doc")), "-t", "role", "spegel_node.spegel_node.spegel_node"],
        capture_output=True, text=True, timeout=120, check=False,
        env=ansible_env(tmp_path) | {"ANSIBLE_COLLECTIONS_PATH": str(dest)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "spegel_node_doctor_ignore" in proc.stdout

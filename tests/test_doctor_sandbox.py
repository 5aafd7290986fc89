"""doctor against the real sandbox node: a real containerd (1.6.20 here), a real registry as
Spegel, files written by a real `apply`.

The node root is a temp dir whose node paths lead into the sandbox: the containerd socket and
config are symlinks to the sandbox's (the last component of a node path is opened by the kernel),
and the hosts dir, at the node path the sandbox config's `config_path` names, is a real
directory in the node root, which the sandbox's own hosts-dir path links to (symlinks *inside*
the root resolve inside it, as on a node seen from a pod). Like `--root /host` in a pod: no
program is run, everything comes from files and sockets.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_cli, tree_state
from support.sandbox import Sandbox

from spegel_node.doctor import Facts, diagnose
from spegel_node.node import Node
from spegel_node.settings import load_settings

pytestmark = pytest.mark.sandbox


def make_root(sandbox: Sandbox, base: Path) -> Path:
    root = base / "node"
    links = {
        "/run/containerd/containerd.sock": sandbox.containerd.socket,
        str(sandbox.containerd.socket): sandbox.containerd.socket,  # its config's [grpc] address
        "/etc/containerd/config.toml": sandbox.containerd.config_path,
    }
    node_hosts = root / str(sandbox.hosts_dir).lstrip("/")
    node_hosts.mkdir(parents=True)
    for entry in sandbox.hosts_dir.iterdir():
        shutil.move(entry, node_hosts / entry.name)
    sandbox.hosts_dir.rmdir()
    sandbox.hosts_dir.symlink_to(node_hosts)  # containerd (on the host) reads through it
    for node_path, target in links.items():
        link = root / node_path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    conf = root / "etc/spegel-node/config.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text(
        f'node_ip = "127.0.0.1"\nhost_port = {sandbox.spegel.port}\n'
        f'registries = ["{sandbox.upstream.url}"]\n'
    )
    return root


def doctor(
    capsys: pytest.CaptureFixture[str], root: Path, *args: str
) -> tuple[int, dict[str, Any]]:
    result = run_cli(capsys, "doctor", "--root", str(root), "--output", "json", *args)
    data = json.loads(result.out)
    data["by_id"] = {c["id"]: c for c in data["checks"]}
    return result.code, data


@pytest.fixture
def node(sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = make_root(sandbox, tmp_path)
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(root))
    assert result.code == 0, result.err
    return root


def test_healthy_sandbox_then_mirror_stopped_then_broken_file(
    sandbox: Sandbox, node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = sandbox.upstream.host
    code, data = doctor(capsys, node)
    assert code == 0, json.dumps(data["checks"], indent=1)
    c = data["by_id"]
    assert data["flavor"] == "containerd"
    assert c["containerd.socket"]["status"] == "pass"
    assert c["containerd.socket"]["summary"].startswith("containerd 1.6.20")
    assert c["containerd.config_path"]["status"] == "pass"
    assert "from the running containerd" in c["containerd.config_path"]["summary"]
    assert c["containerd.discard_unpacked_layers"]["status"] == "pass"
    assert c["containerd.local_image_pull"]["status"] == "skip"
    # containerd 1.6 ignores dial_timeout: a warning, with what to do about it
    hosts = c[f"hosts.{registry}"]
    assert hosts["status"] == "warn" and "dial_timeout.ignored" in hosts["summary"]
    assert "upgrade containerd to 2.0.7+" in hosts["remediation"]
    assert c["spegel.v2"]["status"] == "pass"
    assert c["agent.drift"]["status"] == "pass"
    assert c["agent.timer"]["status"] == "warn"

    sandbox.spegel.stop()
    code, data = doctor(capsys, node)
    assert code == 1
    v2 = data["by_id"]["spegel.v2"]
    assert v2["status"] == "fail" and "connection refused" in v2["summary"]

    sandbox.spegel.start()
    sandbox.write_hosts_toml(
        f'server = "{sandbox.upstream.url}"\n\n[host."{sandbox.spegel.url}"]\n'
        '  capabilities = "pull"\n'
    )
    code, data = doctor(capsys, node)
    assert code == 1
    hosts = data["by_id"][f"hosts.{registry}"]
    assert hosts["status"] == "fail"
    assert "capabilities.type" in hosts["summary"] and "dropped by containerd" in hosts["summary"]
    # and containerd agrees: the file is dropped, the pull goes upstream
    sandbox.mark_logs()
    assert sandbox.pull().returncode == 0
    assert not sandbox.spegel.containerd_requests()
    assert sandbox.upstream.containerd_requests()


def test_image_served_by_the_mirror_or_not(
    sandbox: Sandbox, node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sandbox.pull(keep=True).returncode == 0  # through the mirror (a pull-through cache)
    code, data = doctor(capsys, node, "--image", sandbox.image_ref)
    image = data["by_id"]["spegel.image"]
    assert image["status"] == "pass", image
    assert image["summary"].startswith(f"a peer can serve {sandbox.image_ref} (sha256:")
    code, data = doctor(capsys, node, "--image", f"{sandbox.upstream.host}/never/pushed:v1")
    image = data["by_id"]["spegel.image"]
    assert code == 1 and image["status"] == "fail" and "answered 404" in image["summary"]


def test_doctor_leaves_the_sandbox_node_as_it_was(
    sandbox: Sandbox, node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (tree_state(node), tree_state(sandbox.hosts_dir))
    doctor(capsys, node)
    run_cli(capsys, "doctor", "--root", str(node))
    assert (tree_state(node), tree_state(sandbox.hosts_dir)) == before


def test_live_cri_config_comes_from_the_real_containerd(sandbox: Sandbox, node: Path) -> None:
    n = Node(node)
    facts = Facts(n, load_settings(n))
    live = facts.live_config
    assert live is not None
    assert live.config_path == str(sandbox.hosts_dir)
    assert live.discard_unpacked_layers is False
    assert facts.containerd_version.version == (1, 6, 20)
    assert facts.containerd_version.source == "the running containerd"


def test_version_from_the_binary_on_a_live_root(sandbox: Sandbox, tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text("version = 2\n")
    n = Node(root)
    facts = Facts(n, load_settings(n), live=True, containerd_binaries=["/usr/bin/containerd"])
    version = facts.containerd_version
    assert version.version is not None and version.version[:2] == (1, 6)
    assert version.source == "/usr/bin/containerd --version"


def test_doctor_is_fast_on_the_sandbox(sandbox: Sandbox, node: Path) -> None:
    n = Node(node)
    durations = []
    for _ in range(5):
        started = time.monotonic()
        run = diagnose(Facts(n, load_settings(n)))
        durations.append(time.monotonic() - started)
        assert run.ok
    assert statistics.median(durations) < 0.5, durations

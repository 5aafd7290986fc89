"""apply and remove on a node tree under --root (the real-containerd proof is in test_e2e.py)."""

from __future__ import annotations

import http.server
import json
import stat
import threading
import tomllib
from pathlib import Path

import pytest
from support.cli import Result, run_cli, tree_state
from support.faults import after_scan

HOSTS = "/etc/containerd/certs.d"
PERSON_FILE = """\
# Our pull-through cache for ghcr; do not remove (ticket OPS-42)
server = "https://ghcr.io"

[host."https://cache.example.com"]
  capabilities = ["pull", "resolve"]
  ca = "cache-ca.crt"
  [host."https://cache.example.com".header]
    Authorization = "Bearer s3cr3t-t0ken"
"""


@pytest.fixture
def node(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{HOSTS}"\n'
    )
    (root / "run/containerd").mkdir(parents=True)
    (root / "run/containerd/containerd.sock").touch()
    (root / "etc/spegel-node").mkdir(parents=True)
    (root / "etc/spegel-node/config.toml").write_text(
        'registries = ["https://docker.io", "https://ghcr.io", "http://127.0.0.1:5000"]\n'
        'node_ip = "10.0.0.5"\n'
    )
    return root


def cli(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> Result:
    return run_cli(capsys, *args, "--root", str(root))


def hosts(root: Path) -> Path:
    return root / HOSTS.lstrip("/")


def test_apply_creates_managed_files_with_spegel_first(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    result = cli(capsys, node, "apply", "--no-gate")
    assert result.code == 0, result.err
    docker = (hosts(node) / "docker.io/hosts.toml").read_text()
    assert docker.startswith("# managed by spegel-node\n")
    parsed = tomllib.loads(docker)
    assert parsed["server"] == "https://registry-1.docker.io"
    assert parsed["host"] == {
        "http://10.0.0.5:29999": {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"}
    }
    assert tomllib.loads((hosts(node) / "127.0.0.1:5000/hosts.toml").read_text())["server"] == (
        "http://127.0.0.1:5000"
    )
    for path in hosts(node).rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644)
    state = node / "var/lib/spegel-node/state.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600


def test_second_apply_changes_nothing(capsys: pytest.CaptureFixture[str], node: Path) -> None:
    cli(capsys, node, "apply", "--no-gate")
    before = tree_state(hosts(node))
    result = cli(capsys, node, "apply", "--no-gate")
    assert result.code == 0
    assert "nothing to change" in result.out
    assert tree_state(hosts(node)) == before


def test_merge_keeps_a_persons_file_and_remove_restores_it_byte_for_byte(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    ghcr = hosts(node) / "ghcr.io"
    ghcr.mkdir(parents=True)
    (ghcr / "hosts.toml").write_text(PERSON_FILE)
    (ghcr / "cache-ca.crt").write_text("CERT")
    assert cli(capsys, node, "apply", "--no-gate").code == 0
    merged = (ghcr / "hosts.toml").read_text()
    assert "# Our pull-through cache for ghcr" in merged
    assert list(tomllib.loads(merged)["host"]) == [
        "http://10.0.0.5:29999",
        "https://cache.example.com",
    ]
    assert tomllib.loads(merged)["host"]["https://cache.example.com"]["ca"] == "cache-ca.crt"
    assert (ghcr / "cache-ca.crt").read_text() == "CERT"

    result = cli(capsys, node, "remove")
    assert result.code == 0, result.err
    assert (ghcr / "hosts.toml").read_text() == PERSON_FILE
    assert (ghcr / "cache-ca.crt").read_text() == "CERT"
    assert sorted(p.name for p in hosts(node).iterdir()) == ["ghcr.io"]  # created dirs are gone
    assert not (node / "var/lib/spegel-node/state.json").exists()


def test_remove_after_a_rewrite_only_strips_spegel(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    cli(capsys, node, "apply", "--no-gate")
    docker = hosts(node) / "docker.io/hosts.toml"
    rewritten = docker.read_text().replace("# managed by spegel-node\n", "# edited by hand\n")
    docker.write_text(rewritten)
    assert cli(capsys, node, "remove").code == 0
    left = docker.read_text()
    assert "10.0.0.5:29999" not in left
    assert left.startswith("# edited by hand\n")


def test_dry_run_writes_nothing_and_redacts_headers(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    ghcr = hosts(node) / "ghcr.io"
    ghcr.mkdir(parents=True)
    (ghcr / "hosts.toml").write_text(PERSON_FILE)
    before = tree_state(node)
    result = cli(capsys, node, "apply", "--dry-run", "--no-gate")
    assert result.code == 0
    assert '+[host."http://10.0.0.5:29999"]' in result.out
    assert "would create /etc/containerd/certs.d/docker.io/hosts.toml" in result.out
    assert "s3cr3t" not in result.out + result.err
    assert tree_state(node) == before
    as_json = cli(capsys, node, "apply", "--dry-run", "--no-gate", "--output", "json")
    assert "s3cr3t" not in as_json.out
    assert json.loads(as_json.out)["dry_run"] is True


def test_existing_host_port_dir_is_used_not_shadowed(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    talos_style = hosts(node) / "127.0.0.1_5000_"
    talos_style.mkdir(parents=True)
    assert cli(capsys, node, "apply", "--no-gate").code == 0
    assert (talos_style / "hosts.toml").exists()
    assert not (hosts(node) / "127.0.0.1:5000").exists()


def test_default_mode_writes_default_and_every_existing_registry_dir(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    (node / "etc/spegel-node/config.toml").write_text('registries = []\nnode_ip = "10.0.0.5"\n')
    (hosts(node) / "quay.io").mkdir(parents=True)  # an empty dir would hide _default
    assert cli(capsys, node, "apply", "--no-gate").code == 0
    default = tomllib.loads((hosts(node) / "_default/hosts.toml").read_text())
    assert "server" not in default
    assert list(default["host"]) == ["http://10.0.0.5:29999"]
    quay = tomllib.loads((hosts(node) / "quay.io/hosts.toml").read_text())
    assert quay["server"] == "https://quay.io"
    assert list(quay["host"]) == ["http://10.0.0.5:29999"]


def test_changed_port_replaces_the_old_mirror(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    cli(capsys, node, "apply", "--no-gate")
    cfg = node / "etc/spegel-node/config.toml"
    cfg.write_text(cfg.read_text() + "host_port = 30020\n")
    assert cli(capsys, node, "apply", "--no-gate").code == 0
    docker = tomllib.loads((hosts(node) / "docker.io/hosts.toml").read_text())
    assert list(docker["host"]) == ["http://10.0.0.5:30020"]


def test_symlinked_registry_dir_is_refused_and_not_written_through(
    capsys: pytest.CaptureFixture[str], node: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    hosts(node).mkdir(parents=True)
    (hosts(node) / "ghcr.io").symlink_to(outside)
    result = cli(capsys, node, "apply", "--no-gate")
    assert result.code == 1
    assert "ghcr.io is a symlink" in result.err
    assert list(outside.iterdir()) == []
    assert (hosts(node) / "docker.io/hosts.toml").exists()  # the other registries are still served


class _Spegel(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_gate_withdraws_after_three_failures_and_restores(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Spegel)
    port = server.server_address[1]
    (node / "etc/spegel-node/config.toml").write_text(
        f'registries = ["https://ghcr.io"]\nnode_ip = "127.0.0.1"\nhost_port = {port}\n'
    )
    server.server_close()  # nothing listens on the port now
    docker = hosts(node) / "ghcr.io/hosts.toml"
    outcomes = [cli(capsys, node, "apply", "--output", "json") for _ in range(3)]
    assert [json.loads(o.out)["gate"]["withdrawn"] for o in outcomes] == [False, False, True]
    assert "withdrawing mirror" in outcomes[2].err
    assert "host" not in tomllib.loads(docker.read_text())  # the file stays; no Spegel host

    server = http.server.HTTPServer(("127.0.0.1", port), _Spegel)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = cli(capsys, node, "apply")
    finally:
        server.shutdown()
        server.server_close()
    assert result.code == 0
    assert "restoring it" in result.err
    assert list(tomllib.loads(docker.read_text())["host"]) == [f"http://127.0.0.1:{port}"]


K3S_REWRITE = """\
# File generated by k3s. DO NOT EDIT.
server = "https://ghcr.io/v2"
capabilities = ["pull", "resolve", "push"]

[host]

[host."https://registry.example.com/v2"]
  capabilities = ["pull", "resolve"]
"""


def test_a_file_rewritten_during_apply_is_not_clobbered(
    capsys: pytest.CaptureFixture[str], node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ghcr = hosts(node) / "ghcr.io/hosts.toml"
    ghcr.parent.mkdir(parents=True)
    ghcr.write_text(PERSON_FILE)
    after_scan(monkeypatch, lambda _: ghcr.write_text(K3S_REWRITE))  # k3s restarts mid-apply
    result = cli(capsys, node, "apply", "--no-gate")
    assert result.code == 0
    assert "ghcr.io/hosts.toml changed while apply ran" in result.err
    assert ghcr.read_text() == K3S_REWRITE  # not overwritten with a merge of the old file
    monkeypatch.undo()
    assert cli(capsys, node, "apply", "--no-gate").code == 0  # the next run merges the new one
    assert list(tomllib.loads(ghcr.read_text())["host"]) == [
        "http://10.0.0.5:29999",
        "https://registry.example.com/v2",
    ]


def test_hosts_dir_that_is_an_absolute_symlink_is_followed_inside_the_root(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    (node / "var/lib/registry-hosts").mkdir(parents=True)
    hosts(node).symlink_to("/var/lib/registry-hosts")  # absolute: means <root>/var/lib/...
    assert cli(capsys, node, "apply", "--no-gate").code == 0
    assert (node / "var/lib/registry-hosts/docker.io/hosts.toml").exists()
    assert not Path("/var/lib/registry-hosts").exists()

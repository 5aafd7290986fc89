"""doctor on fake node trees: every failure mode gives its check's status and a remediation
that says what to change; a correct node exits 0; nothing on the node changes; bounded time."""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.cli import Result, run_cli, tree_state
from support.fake_containerd import FakeContainerd, cri_config
from support.fake_nodes import (
    make_bottlerocket,
    make_containerd,
    make_eks,
    make_k0s,
    make_k3s,
    make_kind,
    make_rke2,
    make_talos,
    write,
)
from support.sandbox import HangingServer, free_port

from spegel_node import state
from spegel_node.doctor import render
from spegel_node.doctor.checks import spegel as spegel_checks
from spegel_node.doctor.runner import Run
from spegel_node.node import Node
from spegel_node.record import GateState

HOSTS = "/etc/containerd/certs.d"
SECRET = "Bearer s3cr3t-t0ken-do-not-print"
UNITS = ("spegel-node-repair.service", "spegel-node-repair.timer", "spegel-node-repair.path")
DIGEST = "sha256:" + "b" * 64


# --- a Spegel stand-in -----------------------------------------------------------------------------


@dataclass
class FakeSpegel:
    """An HTTP server answering like Spegel: /v2/ 200 with an empty body, /readyz, manifests."""

    readyz: int = 200
    v2: int = 200  # 401: Spegel with basic auth
    images: set[tuple[str, str, str]] = field(default_factory=set)  # (repo, ref, ns)
    metrics: str = ""
    requests: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _handler(spegel: FakeSpegel) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, body: bool) -> None:
            spegel.requests.append(f"{self.command} {self.path}")
            path, _, query = self.path.partition("?")
            status, headers, data = 404, {}, b""
            if path == "/v2/":
                status = spegel.v2
            elif path == "/readyz":
                status = spegel.readyz
            elif path == "/metrics" and spegel.metrics:
                status, data = 200, spegel.metrics.encode()
            elif m := re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", path):
                ns = query.removeprefix("ns=")
                if (m.group(1), m.group(2), ns) in spegel.images:
                    status, headers = 200, {"Docker-Content-Digest": DIGEST}
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer(True)

        def do_HEAD(self) -> None:
            self._answer(False)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def spegel() -> Iterator[FakeSpegel]:
    fake = FakeSpegel()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.port = int(server.server_address[1])
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield fake
    server.shutdown()
    server.server_close()


# --- helpers -----------------------------------------------------------------------------------------


def config(root: Path, port: int, **extra: Any) -> None:
    lines = ['node_ip = "127.0.0.1"', f"host_port = {port}"]
    extra.setdefault("registries", ["https://docker.io", "https://ghcr.io"])
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    write(root, "/etc/spegel-node/config.toml", "\n".join(lines) + "\n")


def install_units(root: Path, enable: bool = True) -> None:
    for unit in UNITS:
        write(root, f"/etc/systemd/system/{unit}", "[Unit]\n")
    if enable:
        for wants, unit in (("timers", UNITS[1]), ("paths", UNITS[2])):
            link = root / f"etc/systemd/system/{wants}.target.wants/{unit}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f"/etc/systemd/system/{unit}")


def doctor(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> Result:
    return run_cli(capsys, "doctor", "--root", str(root), *args)


def doctor_json(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> dict[str, Any]:
    result = doctor(capsys, root, "--output", "json", *args)
    assert result.code in (0, 1), result.err
    data: dict[str, Any] = json.loads(result.out)
    assert data["ok"] == (result.code == 0)
    data["by_id"] = {c["id"]: c for c in data["checks"]}
    return data


def check(data: dict[str, Any], check_id: str) -> dict[str, Any]:
    found: dict[str, Any] = data["by_id"][check_id]
    return found


def apply(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(root))
    assert result.code == 0, result.err


@pytest.fixture
def healthy_node(
    tmp_path: Path, spegel: FakeSpegel, capsys: pytest.CaptureFixture[str]
) -> Iterator[tuple[Path, FakeContainerd]]:
    """Plain containerd 2.0.7 with config_path set, Spegel answering, applied, units enabled."""
    root = tmp_path / "node"
    make_containerd(root, config_path=HOSTS)
    config(root, spegel.port)
    apply(capsys, root)
    install_units(root)
    sock = root / "run/containerd/containerd.sock"
    with FakeContainerd(sock, version="2.0.7", config=cri_config(HOSTS)) as fake:
        yield root, fake


@pytest.fixture
def healthy(healthy_node: tuple[Path, FakeContainerd]) -> Path:
    return healthy_node[0]


@pytest.fixture
def ctd(healthy_node: tuple[Path, FakeContainerd]) -> FakeContainerd:
    """The healthy node's containerd socket: tests change its version, config or mode."""
    return healthy_node[1]


# --- a correct node ----------------------------------------------------------------------------------


def test_healthy_node_passes_and_exits_0(capsys: pytest.CaptureFixture[str], healthy: Path) -> None:
    data = doctor_json(capsys, healthy)
    statuses = {c["id"]: c["status"] for c in data["checks"]}
    assert data["ok"] is True and data["flavor"] == "containerd"
    assert list(statuses) == [
        "layout.detected",
        "containerd.socket",
        "containerd.config",
        "containerd.config_path",
        "containerd.discard_unpacked_layers",
        "containerd.local_image_pull",
        "hosts.docker.io",
        "hosts.ghcr.io",
        "hosts.shadowing",
        "hosts.stale",
        "spegel.v2",
        "spegel.readyz",
        "spegel.metrics",
        "agent.drift",
        "agent.gate",
        "agent.timer",
    ]
    expected = dict.fromkeys(statuses, "pass")
    expected["containerd.local_image_pull"] = "skip"  # 2.0.7: no transfer-service pulls
    expected["spegel.metrics"] = "skip"  # nothing on 127.0.0.1:9090
    assert statuses == expected, json.dumps(data["checks"], indent=1)
    assert all(c["remediation"] == "" for c in data["checks"] if c["status"] == "pass")
    assert "containerd 2.0.7 answers" in check(data, "containerd.socket")["summary"]
    assert check(data, "containerd.config_path")["summary"] == (
        f"config_path = {HOSTS} (from the running containerd) includes {HOSTS}"
    )
    assert 0 < data["duration_s"] < 1
    assert set(data) >= {"ok", "flavor", "duration_s", "checks"}
    assert set(data["checks"][0]) >= {"id", "status", "summary", "remediation"}


def test_healthy_node_without_the_timer_only_warns(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    for p in sorted((healthy / "etc/systemd").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
    result = doctor(capsys, healthy)
    assert result.code == 0
    assert "[!] agent.timer  the repair units" in result.out
    assert "systemctl enable --now spegel-node-repair.timer spegel-node-repair.path" in result.out
    assert result.out.strip().splitlines()[-1].startswith("1 warning (16 checks in ")


def test_units_installed_but_not_enabled_warns(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    for wants in ("timers", "paths"):
        for link in (healthy / f"etc/systemd/system/{wants}.target.wants").iterdir():
            link.unlink()
    data = doctor_json(capsys, healthy)
    timer = check(data, "agent.timer")
    assert timer["status"] == "warn" and "not enabled" in timer["summary"]
    assert "systemctl enable --now" in timer["remediation"]


def test_plain_output_is_one_line_per_check_with_indented_fixes(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    (healthy / "etc/containerd/certs.d/ghcr.io/hosts.toml").write_text(
        'server = "https://ghcr.io"\n'
    )
    result = doctor(capsys, healthy)
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines[0].startswith("spegel-node doctor: containerd node, mirror http://127.0.0.1:")
    assert "[✓] spegel.v2  http://127.0.0.1:" in result.out
    bad = next(i for i, line in enumerate(lines) if line.startswith("[✗] hosts.ghcr.io"))
    assert lines[bad + 1].startswith("    run `spegel-node apply --root ")
    assert re.fullmatch(r"2 checks failed \(16 checks in \d\.\d\d s\)", lines[-1])


def test_rich_table_on_a_terminal(healthy: Path) -> None:
    from spegel_node.doctor import Facts, diagnose
    from spegel_node.settings import load_settings

    node = Node(healthy)
    facts = Facts(node, load_settings(node))
    run = diagnose(facts)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    render.print_report(run, facts.flavor, facts.mirror_url, "text", out)
    text = out.getvalue()
    assert "spegel-node doctor: containerd node" in text
    assert "✓" in text and "spegel.v2" in text and "no issues found" in text


# --- containerd settings, per flavor -----------------------------------------------------------------


def test_config_path_unset_gives_the_v2_snippet(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel
) -> None:
    make_containerd(tmp_path)  # `containerd config default`: config_path = ""
    config(tmp_path, spegel.port)
    c = check(doctor_json(capsys, tmp_path), "containerd.config_path")
    assert c["status"] == "fail" and "config_path is not set" in c["summary"]
    assert (
        '[plugins."io.containerd.grpc.v1.cri".registry]\n    config_path = "/etc/containerd/certs.d"'
        in c["remediation"]
    )
    assert "add to /etc/containerd/config.toml" in c["remediation"]
    assert c["remediation"].endswith("then: sudo systemctl restart containerd")


def test_eks_discards_layers_v3_and_v2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel
) -> None:
    for version, table in (
        (3, '[plugins."io.containerd.cri.v1.images"]'),
        (2, '[plugins."io.containerd.grpc.v1.cri".containerd]'),
    ):
        root = tmp_path / f"v{version}"
        make_eks(root, version=version)
        config(root, spegel.port)
        c = check(doctor_json(capsys, root), "containerd.discard_unpacked_layers")
        assert c["status"] == "fail", c
        assert "discard_unpacked_layers = true" in c["summary"]
        assert "NodeConfig" in c["remediation"]
        assert f"      {table}\n        discard_unpacked_layers = false" in c["remediation"]


def test_kind_discard_fix_is_a_containerd_config_patch(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel
) -> None:
    make_kind(tmp_path)
    config(tmp_path, spegel.port)
    c = check(doctor_json(capsys, tmp_path), "containerd.discard_unpacked_layers")
    assert c["status"] == "fail"
    assert "containerdConfigPatches:\n- |-\n" in c["remediation"]
    assert '[plugins."io.containerd.grpc.v1.cri".containerd]' in c["remediation"]


def test_talos_discard_fix_is_the_machine_config_part(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel
) -> None:
    make_talos(tmp_path)
    config(tmp_path, spegel.port)
    data = doctor_json(capsys, tmp_path)
    c = check(data, "containerd.discard_unpacked_layers")
    assert c["status"] == "fail"
    assert "talosctl patch mc" in c["remediation"]
    assert "- path: /etc/cri/conf.d/20-customization.part" in c["remediation"]
    assert (
        '[plugins."io.containerd.cri.v1.images"]\n          discard_unpacked_layers = false'
        in c["remediation"]
    )
    hosts = check(data, "hosts.docker.io")  # Talos's generated file has no Spegel
    assert hosts["status"] == "fail"
    assert 'machine:\n  registries:\n    mirrors:\n      "docker.io":' in hosts["remediation"]
    assert f"- http://127.0.0.1:{spegel.port}" in hosts["remediation"]
    assert check(data, "agent.timer")["status"] == "skip"

    fixed = tmp_path / "fixed"
    make_talos(fixed, customization=True)
    config(fixed, spegel.port)
    c = check(doctor_json(capsys, fixed), "containerd.discard_unpacked_layers")
    assert c["status"] == "pass"


def test_k0s_config_path_fix_is_a_dropin(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel
) -> None:
    make_k0s(tmp_path)
    config(tmp_path, spegel.port)
    c = check(doctor_json(capsys, tmp_path), "containerd.config_path")
    assert c["status"] == "fail"
    assert "/etc/k0s/containerd.d/spegel-node.toml" in c["remediation"]
    assert "spegel-node configure-containerd --root " in c["remediation"]
    assert "sudo systemctl restart k0sworker" in c["remediation"]


def test_bottlerocket_fix_is_its_api_settings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel
) -> None:
    make_bottlerocket(tmp_path)
    config(tmp_path, spegel.port)
    c = check(doctor_json(capsys, tmp_path), "containerd.config_path")
    assert c["status"] == "fail"
    assert "apiclient set --json" in c["remediation"]
    assert f"http://127.0.0.1:{spegel.port}" in c["remediation"]


@pytest.mark.parametrize(
    ("imports", "where"),
    [(True, "config-v3.toml.d/50-spegel.toml"), (False, "config-v3.toml.tmpl")],
)
def test_k3s_on_containerd_2_1_multi_root_config_path_needs_local_image_pull(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    spegel: FakeSpegel,
    imports: bool,
    where: str,
) -> None:
    """Measured (tests/test_cri_pull.py): on 2.1+ the transfer service reads hosts.toml from one
    config_path root and ignores a config_path of several; use_local_image_pull = true fixes it."""
    make_k3s(tmp_path, imports=imports)
    config(tmp_path, spegel.port)
    hosts = "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"
    sock = tmp_path / "run/k3s/containerd/containerd.sock"
    with FakeContainerd(sock, version="v2.1.3-k3s1", config=cri_config(hosts)):
        c = check(doctor_json(capsys, tmp_path), "containerd.local_image_pull")
    assert c["status"] == "pass" and "one config_path root" in c["summary"]
    two_roots = f"{hosts}:/etc/docker/certs.d"
    with FakeContainerd(sock, version="v2.1.3-k3s1", config=cri_config(two_roots)):
        c = check(doctor_json(capsys, tmp_path), "containerd.local_image_pull")
    assert c["status"] == "fail" and "containerd 2.1.3-k3s1" in c["summary"]
    assert "2 roots" in c["summary"] and "Spegel #1272" in c["summary"]
    assert where in c["remediation"]
    assert f'config_path = "{hosts}"' in c["remediation"]
    assert (
        '[plugins."io.containerd.cri.v1.images"]\n    use_local_image_pull = true'
        in c["remediation"]
    )
    with FakeContainerd(
        sock, version="2.1.3", config=cri_config(two_roots, use_local_image_pull=True)
    ):
        c = check(doctor_json(capsys, tmp_path), "containerd.local_image_pull")
    assert c["status"] == "pass" and "running containerd" in c["summary"]


def test_live_values_win_over_the_file(
    capsys: pytest.CaptureFixture[str], healthy: Path, ctd: FakeContainerd
) -> None:
    # the running containerd still discards (the file was fixed, containerd not restarted)
    ctd.config = cri_config(HOSTS, discard_unpacked_layers=True)
    c = check(doctor_json(capsys, healthy), "containerd.discard_unpacked_layers")
    assert c["status"] == "fail" and "the running containerd" in c["summary"]
    assert "already says false; restart containerd" in c["remediation"]
    # config_path set in the file, but not in the running containerd: only 1.x's CRI status
    # carries the registry settings (2.1.9 answers an empty configPath whatever it uses)
    ctd.config, ctd.version = cri_config(""), "1.7.35"
    c = check(doctor_json(capsys, healthy), "containerd.config_path")
    assert c["status"] == "fail" and "not restarted since" in c["summary"]
    assert c["remediation"] == "restart containerd: sudo systemctl restart containerd"
    ctd.version = "2.1.9"
    c = check(doctor_json(capsys, healthy), "containerd.config_path")
    assert c["status"] == "pass", c
    ctd.version = "2.0.4"
    # the file discards, the running containerd does not (yet)
    ctd.config = cri_config(HOSTS)
    text = (healthy / "etc/containerd/config.toml").read_text()
    (healthy / "etc/containerd/config.toml").write_text(
        text.replace("discard_unpacked_layers = false", "discard_unpacked_layers = true")
    )
    c = check(doctor_json(capsys, healthy), "containerd.discard_unpacked_layers")
    assert c["status"] == "warn" and "next restart breaks Spegel" in c["summary"]


@pytest.mark.parametrize(
    ("mode", "fragment"),
    [("hang", "did not answer within 1s: containerd is hung"), ("garbage", "not with HTTP/2")],
)
def test_socket_that_does_not_speak_containerd(
    capsys: pytest.CaptureFixture[str], healthy: Path, ctd: FakeContainerd, mode: str, fragment: str
) -> None:
    ctd.mode = mode
    c = check(doctor_json(capsys, healthy), "containerd.socket")
    assert c["status"] == "fail" and fragment in c["summary"]


def test_placeholder_socket_and_missing_socket(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel
) -> None:
    make_k3s(tmp_path)
    config(tmp_path, spegel.port)
    c = check(doctor_json(capsys, tmp_path), "containerd.socket")
    assert c["status"] == "fail" and "is not a socket" in c["summary"]
    (tmp_path / "run/k3s/containerd/containerd.sock").unlink()
    c = check(doctor_json(capsys, tmp_path), "containerd.socket")
    assert c["status"] == "fail" and "does not exist" in c["summary"]
    assert "sudo systemctl restart k3s" in c["remediation"]


def test_missing_import_and_mirrors_with_config_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel
) -> None:
    make_containerd(tmp_path, config_path=HOSTS)
    config(tmp_path, spegel.port)
    cfg = tmp_path / "etc/containerd/config.toml"
    original = cfg.read_text()
    cfg.write_text(original.replace("imports = []", 'imports = ["/etc/containerd/conf.d/x.toml"]'))
    c = check(doctor_json(capsys, tmp_path), "containerd.config")
    assert c["status"] == "fail" and "containerd will not start" in c["summary"]
    cfg.write_text(
        original
        + '        [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
        + '          endpoint = ["https://m.example.com"]\n'
    )
    c = check(doctor_json(capsys, tmp_path), "containerd.config")
    assert c["status"] == "fail" and "refuses to load" in c["summary"]
    cfg.write_text("version = 2\n[plugins\n")
    c = check(doctor_json(capsys, tmp_path), "containerd.config")
    assert c["status"] == "fail" and "not valid TOML" in c["summary"]


def test_config_path_that_misses_the_hosts_dir(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel
) -> None:
    make_containerd(tmp_path, config_path=HOSTS)
    config(tmp_path, spegel.port, hosts_dir="/opt/other-hosts")
    c = check(doctor_json(capsys, tmp_path), "containerd.config_path")
    assert c["status"] == "fail" and "does not include /opt/other-hosts" in c["summary"]
    assert 'set hosts_dir = "/etc/containerd/certs.d"' in c["remediation"]
    assert 'config_path = "/opt/other-hosts:/etc/containerd/certs.d"' in c["remediation"]


# --- hosts files -------------------------------------------------------------------------------------


def test_broken_hosts_toml_fails_with_the_finding_and_no_secret(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    bad = healthy / "etc/containerd/certs.d/docker.io/hosts.toml"
    bad.write_text(
        'server = "https://registry-1.docker.io"\n\n'
        '[host."http://127.0.0.1:1"]\n  capabilities = "pull"\n'
        f'  [host."http://127.0.0.1:1".header]\n    Authorization = "{SECRET}"\n'
    )
    data = doctor_json(capsys, healthy)
    c = check(data, "hosts.docker.io")
    assert c["status"] == "fail"
    assert "is dropped by containerd: capabilities.type (line 4)" in c["summary"]
    assert "spegel-node validate /etc/containerd/certs.d/docker.io/hosts.toml" in c["remediation"]
    text = doctor(capsys, healthy)
    assert text.code == 1
    for output in (json.dumps(data), text.out, text.err):
        assert "s3cr3t" not in output


def test_secret_never_printed_when_the_file_is_fine_either(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    f = healthy / "etc/containerd/certs.d/docker.io/hosts.toml"
    f.write_text(
        f.read_text()
        + '\n[host."https://user:pw@cache.example.com"]\n  capabilities = ["pull"]\n'
        + "  skip-verify = true\n"
        + f'  [host."https://user:pw@cache.example.com".header]\n    Authorization = "{SECRET}"\n'
    )
    text = doctor(capsys, healthy)
    data = doctor_json(capsys, healthy)
    assert check(data, "hosts.docker.io")["status"] == "warn"  # the typo'd key
    for output in (text.out, json.dumps(data)):
        assert "s3cr3t" not in output and "user:pw" not in output


def test_spegel_missing_or_not_first(capsys: pytest.CaptureFixture[str], healthy: Path) -> None:
    f = healthy / "etc/containerd/certs.d/ghcr.io/hosts.toml"
    f.write_text(
        'server = "https://ghcr.io"\n\n[host."https://cache.example.com"]\n  capabilities = ["pull"]\n'
    )
    c = check(doctor_json(capsys, healthy), "hosts.ghcr.io")
    assert c["status"] == "fail" and "does not list the Spegel mirror" in c["summary"]
    assert "it lists https://cache.example.com" in c["summary"]
    assert "spegel-node apply" in c["remediation"]
    f.write_text(
        f.read_text()
        + f'\n[host."http://127.0.0.1:{healthy_port(healthy)}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    c = check(doctor_json(capsys, healthy), "hosts.ghcr.io")
    assert c["status"] == "fail" and "before Spegel: containerd asks it first" in c["summary"]


def healthy_port(root: Path) -> int:
    m = re.search(r"host_port = (\d+)", (root / "etc/spegel-node/config.toml").read_text())
    assert m
    return int(m.group(1))


def test_spegel_without_resolve_or_dial_timeout_warns(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    f = healthy / "etc/containerd/certs.d/ghcr.io/hosts.toml"
    f.write_text(
        f'server = "https://ghcr.io"\n\n[host."http://127.0.0.1:{healthy_port(healthy)}"]\n'
        '  capabilities = ["pull"]\n'
    )
    c = check(doctor_json(capsys, healthy), "hosts.ghcr.io")
    assert c["status"] == "warn" and "lacks resolve" in c["summary"]
    assert any("no dial_timeout" in d for d in c["details"])


def test_no_dir_and_empty_dir(capsys: pytest.CaptureFixture[str], healthy: Path) -> None:
    ghcr = healthy / "etc/containerd/certs.d/ghcr.io"
    (ghcr / "hosts.toml").unlink()
    c = check(doctor_json(capsys, healthy), "hosts.ghcr.io")
    assert c["status"] == "fail" and "ghcr.io/ has no hosts.toml" in c["summary"]
    ghcr.rmdir()
    c = check(doctor_json(capsys, healthy), "hosts.ghcr.io")
    assert c["status"] == "fail" and "pulls it straight from upstream" in c["summary"]


def test_withdrawn_gate_is_said_instead_of_failing(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    node = Node(healthy)
    record = state.load_record(node)
    gate = GateState(3, True, False, time.time(), time.time(), "connection refused")
    from dataclasses import replace

    state.save_record(node, replace(record, gate=gate))
    for name in ("docker.io", "ghcr.io"):
        f = healthy / f"etc/containerd/certs.d/{name}/hosts.toml"
        f.write_text(f.read_text().split("\n[host.")[0])
    data = doctor_json(capsys, healthy)
    c = check(data, "hosts.docker.io")
    assert c["status"] == "warn"
    assert (
        "health gate withdrew Spegel after 3 failed /v2/ probes (last: connection refused)"
        in c["summary"]
    )
    g = check(data, "agent.gate")
    assert g["status"] == "warn" and "withdrawn" in g["summary"]


def test_shadowing_and_hidden_default(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel
) -> None:
    make_containerd(tmp_path, config_path=HOSTS)
    config(tmp_path, spegel.port, registries=[])
    apply(capsys, tmp_path)
    hosts = tmp_path / HOSTS.lstrip("/")
    (hosts / "quay.io").mkdir()  # empty: hides _default for quay.io
    (hosts / "reg.example.com_5000_").mkdir()
    write(
        tmp_path,
        f"{HOSTS}/reg.example.com_5000_/hosts.toml",
        'server = "https://reg.example.com:5000"\n',
    )
    write(
        tmp_path,
        f"{HOSTS}/reg.example.com:5000/hosts.toml",
        'server = "https://reg.example.com:5000"\n',
    )
    data = doctor_json(capsys, tmp_path)
    c = check(data, "hosts.shadowing")
    assert c["status"] == "fail"  # registries = []: everything relies on _default
    assert any(
        "quay.io: no hosts.toml, yet containerd uses this directory instead of _default/" in d
        for d in c["details"]
    )
    assert any(
        "reg.example.com:5000: containerd reads reg.example.com_5000_/ first" in d
        for d in c["details"]
    )
    assert "rmdir" in c["remediation"]
    assert check(data, "hosts._default")["status"] == "pass"
    assert check(data, "hosts.quay.io")["status"] == "fail"
    assert check(data, "hosts.reg.example.com:5000")["summary"].startswith(
        f"{HOSTS}/reg.example.com_5000_/hosts.toml does not list"
    )


def test_roots_searched_in_order(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel
) -> None:
    make_eks(tmp_path)  # config_path = /etc/containerd/certs.d:/etc/docker/certs.d
    config(tmp_path, spegel.port)
    write(
        tmp_path,
        "/etc/docker/certs.d/docker.io/hosts.toml",
        'server = "https://registry-1.docker.io"\n',
    )
    data = doctor_json(capsys, tmp_path)
    assert check(data, "hosts.docker.io")["summary"].startswith(
        "/etc/docker/certs.d/docker.io/hosts.toml does not list"
    )
    (tmp_path / "etc/containerd/certs.d/_default").mkdir()
    c = check(doctor_json(capsys, tmp_path), "hosts.shadowing")
    assert c["status"] == "warn"
    assert (
        "/etc/docker/certs.d/docker.io: hidden by /etc/containerd/certs.d/_default/" in c["details"]
    )


# --- Spegel ------------------------------------------------------------------------------------------


def test_spegel_refused_with_the_30020_hint(
    capsys: pytest.CaptureFixture[str],
    healthy: Path,
    spegel: FakeSpegel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config(healthy, free_port())
    c = check(doctor_json(capsys, healthy), "spegel.v2")
    assert c["status"] == "fail" and "connection refused" in c["summary"]
    assert "kubectl -n kube-system get pods" in c["remediation"]
    monkeypatch.setattr(spegel_checks, "CHART_HOST_PORT", spegel.port)  # "30020" answers
    c = check(doctor_json(capsys, healthy), "spegel.v2")
    assert f"set host_port = {spegel.port}" in c["remediation"]
    assert "service.registry.hostPort" in c["remediation"]


def test_spegel_401_basic_auth_answers_as_a_warning(
    capsys: pytest.CaptureFixture[str], healthy: Path, spegel: FakeSpegel
) -> None:
    spegel.v2 = 401
    data = doctor_json(capsys, healthy)
    c = check(data, "spegel.v2")
    assert c["status"] == "warn" and "HTTP 401" in c["summary"] and "basic auth" in c["summary"]
    assert "Authorization" in c["summary"]
    assert check(data, "spegel.readyz")["status"] == "pass"  # it answers: readyz is asked
    spegel.v2 = 403
    assert check(doctor_json(capsys, healthy), "spegel.v2")["status"] == "fail"


def test_spegel_not_spegel_and_readyz(
    capsys: pytest.CaptureFixture[str], healthy: Path, spegel: FakeSpegel
) -> None:
    spegel.readyz = 500
    c = check(doctor_json(capsys, healthy), "spegel.readyz")
    assert c["status"] == "warn" and "not ready" in c["summary"]
    spegel.readyz = 404
    c = check(doctor_json(capsys, healthy), "spegel.readyz")
    assert c["status"] == "warn" and "before v0.4" in c["summary"]


def test_spegel_metrics_figures(
    capsys: pytest.CaptureFixture[str],
    healthy: Path,
    spegel: FakeSpegel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spegel_checks, "METRICS_PORT", spegel.port)
    spegel.metrics = (
        'spegel_mirror_requests_total{registry="docker.io",cache="hit"} 30\n'
        'spegel_mirror_requests_total{registry="docker.io",cache="miss"} 6\n'
        'spegel_mirror_requests_total{registry="ghcr.io",cache="hit"} 6\n'
        f"spegel_mirror_last_success_timestamp_seconds {time.time() - 42}\n"
    )
    c = check(doctor_json(capsys, healthy), "spegel.metrics")
    assert c["status"] == "pass"
    assert re.fullmatch(
        r"hit ratio 86% \(36 hits, 6 misses\); last served from a peer 4\d s ago", c["summary"]
    ), c["summary"]
    spegel.metrics = "spegel_mirror_last_success_timestamp_seconds 0\n"
    c = check(doctor_json(capsys, healthy), "spegel.metrics")
    assert c["status"] == "warn" and "no mirror request yet; never served" in c["summary"]


def test_image_check(capsys: pytest.CaptureFixture[str], healthy: Path, spegel: FakeSpegel) -> None:
    spegel.images.add(("library/alpine", "3.20", "docker.io"))
    data = doctor_json(capsys, healthy, "--image", "alpine:3.20")
    c = check(data, "spegel.image")
    assert c["status"] == "pass"
    assert c["summary"] == f"a peer can serve docker.io/library/alpine:3.20 ({DIGEST})"
    assert "HEAD /v2/library/alpine/manifests/3.20?ns=docker.io" in spegel.requests
    c = check(doctor_json(capsys, healthy, "--image", "quay.io/x/y:1"), "spegel.image")
    assert c["status"] == "fail" and "Spegel answered 404" in c["summary"]
    assert "crictl pull quay.io/x/y:1" in c["remediation"]
    assert 'add "https://quay.io" to registries' in c["remediation"]
    result = doctor(capsys, healthy, "--image", "UPPER:case")
    assert result.code == 2 and result.err.startswith("spegel-node: error: invalid image reference")


# --- hung Spegel and containerd: bounded time --------------------------------------------------------


def test_hung_spegel_and_hung_containerd_finish_in_bounded_time(
    capsys: pytest.CaptureFixture[str],
    healthy: Path,
    ctd: FakeContainerd,
    hanging_server: HangingServer,
) -> None:
    config(healthy, hanging_server.port)
    ctd.mode = "hang"
    started = time.monotonic()
    data = doctor_json(capsys, healthy, "--image", "alpine")
    wall = time.monotonic() - started
    assert wall < 5 and data["duration_s"] < 5, (wall, data["duration_s"])
    assert wall < 3.5
    v2 = check(data, "spegel.v2")
    assert v2["status"] == "fail" and "Spegel is hung" in v2["summary"]
    assert check(data, "containerd.socket")["status"] == "fail"
    assert check(data, "spegel.image")["status"] == "fail"
    assert check(data, "spegel.readyz")["status"] == "skip"
    assert not data["ok"]


# --- distros -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("distro", ["k3s", "rke2"])
def test_embedded_registry_conflict(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spegel: FakeSpegel, distro: str
) -> None:
    (make_k3s if distro == "k3s" else make_rke2)(tmp_path, embedded_registry=True)
    config(tmp_path, spegel.port)
    data = doctor_json(capsys, tmp_path)
    c = check(data, "k3s.embedded_registry")
    assert c["status"] == "fail"
    assert c["summary"].startswith(
        f"{distro} embeds Spegel (embedded-registry: true in /etc/rancher/{distro}/config.yaml)"
    )
    assert "two registries advertise" in c["summary"]
    assert (
        f"remove `embedded-registry: true` from /etc/rancher/{distro}/config.yaml"
        in c["remediation"]
    )
    y = check(data, "k3s.registries_yaml")
    assert y["status"] == "warn"
    assert (
        f"{distro} regenerates the hosts.toml of docker.io from /etc/rancher/{distro}/registries.yaml"
        in y["summary"]
    )
    assert (
        f'mirrors:\n  "docker.io":\n    endpoint:\n      - "http://127.0.0.1:{spegel.port}"\n'
        '      - "https://registry.example.com"' in y["remediation"]
    )
    install_units(tmp_path)
    y = check(doctor_json(capsys, tmp_path), "k3s.registries_yaml")
    assert y["status"] == "pass" and "repair path unit puts it back" in y["summary"]


def test_k3s_checks_only_on_rancher(capsys: pytest.CaptureFixture[str], healthy: Path) -> None:
    ids = set(doctor_json(capsys, healthy)["by_id"])
    assert not any(i.startswith("k3s.") for i in ids)


# --- the agent's own state ---------------------------------------------------------------------------


def test_drift_since_last_apply(capsys: pytest.CaptureFixture[str], healthy: Path) -> None:
    f = healthy / "etc/containerd/certs.d/docker.io/hosts.toml"
    f.write_text(f.read_text() + "# a comment someone added\n")
    c = check(doctor_json(capsys, healthy), "agent.drift")
    assert c["status"] == "warn" and "changed since the last apply" in c["summary"]
    f.write_text(
        '# File generated by k3s. DO NOT EDIT.\nserver = "https://registry-1.docker.io/v2"\n'
    )
    c = check(doctor_json(capsys, healthy), "agent.drift")
    assert c["status"] == "fail" and "without the Spegel mirror" in c["summary"]
    assert c["remediation"].startswith("run `spegel-node apply --root ")
    (healthy / "etc/containerd/certs.d/ghcr.io/hosts.toml").unlink()
    c = check(doctor_json(capsys, healthy), "agent.drift")
    assert "(and 1 more)" in c["summary"]
    assert any("ghcr.io/hosts.toml: gone since the last apply" in d for d in c["details"])


def test_corrupt_state_record(capsys: pytest.CaptureFixture[str], healthy: Path) -> None:
    (healthy / "var/lib/spegel-node/state.json").write_text("{not json")
    c = check(doctor_json(capsys, healthy), "agent.drift")
    assert c["status"] == "fail" and "is corrupt" in c["summary"]


# --- inputs, outputs, read-only ------------------------------------------------------------------------


def test_no_layout_fails_one_check_and_skips_the_rest(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = doctor_json(capsys, tmp_path)
    assert data["flavor"] is None
    assert check(data, "layout.detected")["status"] == "fail"
    assert "--containerd-socket" in check(data, "layout.detected")["remediation"]
    for cid in (
        "containerd.socket",
        "containerd.config_path",
        "hosts.docker.io",
        "hosts.shadowing",
    ):
        assert check(data, cid)["status"] == "skip"


def test_bad_config_is_exit_2(capsys: pytest.CaptureFixture[str], healthy: Path) -> None:
    write(healthy, "/etc/spegel-node/config.toml", "registries = 3\n")
    result = doctor(capsys, healthy)
    assert result.code == 2 and result.out == ""
    assert result.err.startswith("spegel-node: error: config key 'registries' must be a list")
    assert len(result.err.strip().splitlines()) == 1


def test_textfile_is_prometheus_text_written_atomically(
    capsys: pytest.CaptureFixture[str], healthy: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "textfile"
    out_dir.mkdir()
    target = out_dir / "spegel_node.prom"
    result = doctor(capsys, healthy, "--textfile", str(target))
    assert result.code == 0
    assert os.listdir(out_dir) == ["spegel_node.prom"]
    assert target.stat().st_mode & 0o777 == 0o644
    sample = re.compile(r'^([a-z_]+)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (-?[0-9.e+]+|NaN)$')
    series = {}
    for line in target.read_text().splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        m = sample.match(line)
        assert m, line
        series[m.group(1) + (m.group(2) or "")] = float(m.group(4))
    assert series['spegel_node_check_status{id="spegel.v2",status="pass"}'] == 1
    assert series['spegel_node_check_status{id="spegel.v2",status="fail"}'] == 0
    assert series["spegel_node_doctor_ok"] == 1
    assert 0 < series["spegel_node_doctor_duration_seconds"] < 5
    assert abs(series["spegel_node_doctor_last_run_timestamp_seconds"] - time.time()) < 60
    result = doctor(capsys, healthy, "--textfile", str(tmp_path / "no/such/dir/x.prom"))
    assert result.code == 2 and "does not exist" in result.err


def test_doctor_writes_nothing_on_the_node(
    capsys: pytest.CaptureFixture[str], healthy: Path, tmp_path: Path
) -> None:
    before = tree_state(healthy)
    doctor(capsys, healthy)
    doctor(capsys, healthy, "--output", "json", "--image", "alpine")
    assert tree_state(healthy) == before

    fresh = tmp_path / "fresh"  # never applied: no state dir may appear
    make_k3s(fresh)
    before = tree_state(fresh)
    doctor(capsys, fresh)
    assert tree_state(fresh) == before
    assert not (fresh / "var/lib/spegel-node").exists()


def test_run_summary_counts() -> None:
    from spegel_node.doctor.model import CheckResult, Status

    def r(status: Status) -> CheckResult:
        return CheckResult("x", "layout", status, "s")

    assert (
        render.summary_line(Run((r(Status.PASS),), 0.1)) == "no issues found (1 checks in 0.10 s)"
    )
    run = Run((r(Status.FAIL), r(Status.FAIL), r(Status.WARN), r(Status.SKIP)), 0.41)
    assert render.summary_line(run) == "2 checks failed, 1 warning (4 checks in 0.41 s)"

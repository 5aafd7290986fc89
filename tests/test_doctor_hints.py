"""doctor's remedy texts that point at the cluster side: the namespace in its kubectl hints is
the shipped manifests' (docs/flux: kube-system), and a dead mirror port with Spegel answering on
30020 tells a 0.7.x chart's hostPort from the next chart's NodePort."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.cli import run_cli
from support.fake_nodes import make_containerd, write
from support.peers import helm_template, spegel_module
from support.sandbox import free_port
from support.v2stub import v2_server

from spegel_node.doctor.checks import spegel as spegel_checks

REPO = Path(__file__).resolve().parents[1]
DOCTOR_SRC = REPO / "src/spegel_node/doctor"
APP = REPO / "docs/flux/kubernetes/main/apps/kube-system/spegel/app/kustomization.yaml"


@pytest.fixture
def answering_port() -> Iterator[int]:
    with v2_server() as port:
        yield port


def spegel_v2(capsys: pytest.CaptureFixture[str], root: Path, host_port: int) -> dict[str, str]:
    write(root, "/etc/spegel-node/config.toml", f'node_ip = "127.0.0.1"\nhost_port = {host_port}\n')
    result = run_cli(capsys, "doctor", "--root", str(root), "--output", "json")
    assert result.code == 1, result.err
    (check,) = [c for c in json.loads(result.out)["checks"] if c["id"] == "spegel.v2"]
    assert check["status"] == "fail"
    found: dict[str, str] = check
    return found


def test_kubectl_hints_use_the_shipped_namespace() -> None:
    shipped = yaml.safe_load(APP.read_text())["namespace"]
    assert shipped == "kube-system"
    assert shipped == spegel_checks.SPEGEL_NAMESPACE
    used = set()
    for path in DOCTOR_SRC.rglob("*.py"):
        used |= set(re.findall(r"kubectl -n ([\w{}-]+)", path.read_text()))
    assert used == {"{SPEGEL_NAMESPACE}"}, used  # no literal namespace anywhere else


def test_dead_port_with_30020_answering_tells_hostport_from_nodeport(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    answering_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_containerd(tmp_path, config_path="/etc/containerd/certs.d")
    monkeypatch.setattr(spegel_checks, "CHART_HOST_PORT", answering_port)  # "30020" answers
    dead = free_port()
    fix = spegel_v2(capsys, tmp_path, dead)["remediation"]
    assert f"Spegel answers on port {answering_port} instead of {dead}" in fix
    assert "kubectl -n kube-system get daemonset spegel" in fix
    hostport, nodeport = fix.split("\n- ")[1:]
    assert f"a hostPort {answering_port}" in hostport and "0.7.x" in hostport
    assert f"service.registry.hostPort: {dead}" in hostport
    assert "no hostPort" in nodeport and f"NodePort {answering_port}" in nodeport
    assert f"host_port = {answering_port}" in nodeport and "kube-proxy" in nodeport


def test_dead_30020_says_what_a_hostport_and_a_nodeport_each_need(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_containerd(tmp_path, config_path="/etc/containerd/certs.d")
    port = free_port()
    monkeypatch.setattr(spegel_checks, "CHART_HOST_PORT", port)  # host_port = "30020", dead
    check = spegel_v2(capsys, tmp_path, port)
    fix = check["remediation"]
    assert "connection refused" in check["summary"]
    assert "kubectl -n kube-system get pods -l app.kubernetes.io/name=spegel" in fix
    assert "portmap" in fix and "kube-proxy" in fix and "NodePort" in fix
    assert "instead of" not in fix  # no other port to point at


def test_kubectl_hints_match_the_charts_daemonset(tmp_path: Path) -> None:
    """POD_HINT's label selector and PORTS_HINT's DaemonSet name and container index are what
    Spegel's chart (0.7.3, rendered with the shipped HelmRelease values) creates."""
    helmrelease = APP.parent / "helmrelease.yaml"
    values = yaml.safe_load(helmrelease.read_text())["spec"]["values"]
    values["serviceMonitor"]["enabled"] = False  # no CRD for helm template
    docs = helm_template(spegel_module() / "charts/spegel", values, tmp_path)
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    selector = re.search(r"-l (\S+)=(\S+)", spegel_checks.POD_HINT)
    assert selector
    assert ds["spec"]["template"]["metadata"]["labels"][selector[1]] == selector[2]
    assert f"get daemonset {ds['metadata']['name']} " in spegel_checks.PORTS_HINT
    assert "containers[0].ports" in spegel_checks.PORTS_HINT
    first = ds["spec"]["template"]["spec"]["containers"][0]
    assert first["name"] == "registry"
    assert {p["name"]: p.get("hostPort") for p in first["ports"]}["registry"] == 29999

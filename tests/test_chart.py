"""Spegel's real chart (0.7.3, from the Spegel Go module source) rendered with `helm template`:
the DaemonSet it gives must match what the node side expects, for the docs' HelmRelease values
and for `spegel-node helm-values` on every flavor's fake node. (0.7.4 is refused by the module
proxy; the chart's keys are the same.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import run_cli
from support.fake_nodes import BUILDERS
from support.peers import helm_template, spegel_module

HELMRELEASE = (
    Path(__file__).resolve().parent.parent
    / "docs/flux/kubernetes/main/apps/kube-system/spegel/app/helmrelease.yaml"
)
K3S_CONTENT = "/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content"
RKE2_CONTENT = "/var/lib/rancher/rke2/agent/containerd/io.containerd.content.v1.content"


@pytest.fixture(scope="module")
def chart_dir() -> Path:
    chart = spegel_module() / "charts/spegel"
    assert (chart / "Chart.yaml").is_file()
    return chart


def render(chart: Path, values: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """`helm template` with these values; the DaemonSet's pod spec."""
    daemonsets = [d for d in helm_template(chart, values, tmp_path) if d["kind"] == "DaemonSet"]
    assert len(daemonsets) == 1
    spec: dict[str, Any] = daemonsets[0]["spec"]["template"]["spec"]
    return spec


def host_paths(pod: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        v["name"]: (v["hostPath"]["path"], v["hostPath"].get("type", ""))
        for v in pod["volumes"]
        if "hostPath" in v
    }


def registry_container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod["containers"] if c["name"] == "registry"]
    return container


def check_daemonset(pod: dict[str, Any], spegel: dict[str, Any], host_port: int) -> None:
    paths = host_paths(pod)
    assert paths["containerd-sock"] == (spegel["containerdSock"], "Socket")
    content = spegel.get("containerdContentPath")
    if content:
        assert paths["containerd-content"] == (content, "Directory")
    # containerdMirrorAdd false: no init container, no hostPath of the hosts dir at all
    assert not pod.get("initContainers")
    assert spegel["containerdRegistryConfigPath"] not in {p for p, _ in paths.values()}
    container = registry_container(pod)
    args = container["args"]
    assert f"--containerd-sock={spegel['containerdSock']}" in args
    if content:
        assert f"--containerd-content-path={content}" in args
    ports = {p["name"]: p for p in container["ports"]}
    assert ports["registry"]["hostPort"] == host_port
    if spegel["mirroredRegistries"]:
        start = args.index("--mirrored-registries") + 1
        assert (
            args[start : start + len(spegel["mirroredRegistries"])] == spegel["mirroredRegistries"]
        )


def test_docs_helmrelease_values_render_a_daemonset_for_k3s(
    chart_dir: Path, tmp_path: Path
) -> None:
    values = yaml.safe_load(HELMRELEASE.read_text())["spec"]["values"]
    values["serviceMonitor"]["enabled"] = False  # the CRD is not there for helm template
    assert values["spegel"]["containerdMirrorAdd"] is False
    assert values["spegel"]["containerdContentPath"] == K3S_CONTENT
    pod = render(chart_dir, values, tmp_path)
    check_daemonset(pod, values["spegel"], 29999)


@pytest.mark.parametrize("flavor", sorted(BUILDERS))
def test_helm_values_of_each_flavor_render_the_daemonset_the_node_expects(
    capsys: pytest.CaptureFixture[str], chart_dir: Path, tmp_path: Path, flavor: str
) -> None:
    root = tmp_path / "node"
    BUILDERS[flavor](root)
    result = run_cli(capsys, "helm-values", "-o", "json", "--root", str(root))
    assert result.code == 0, result.err
    values = json.loads(result.out)
    spegel = values["spegel"]
    assert spegel["containerdMirrorAdd"] is False
    if flavor == "k3s":
        assert spegel["containerdContentPath"] == K3S_CONTENT
    if flavor == "rke2":
        assert spegel["containerdContentPath"] == RKE2_CONTENT
    pod = render(chart_dir, values, tmp_path)
    check_daemonset(pod, spegel, values["service"]["registry"]["hostPort"])

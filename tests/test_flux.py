"""The cluster side (docs/flux/): valid YAML, consistent Flux objects, and Helm values that agree
with what `spegel-node helm-values` prints on a k3s node with the same config, and with the
Ansible role's defaults (both halves must agree on hostPort, registries, paths and who owns
the hosts dir)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import fake_nodes
from support.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
FLUX = REPO / "docs" / "flux"
APP_DIR = FLUX / "kubernetes" / "main" / "apps" / "kube-system" / "spegel"
ROLE_DEFAULTS = REPO / "ansible" / "roles" / "spegel_node" / "defaults" / "main.yml"
CHART_TAG = "0.7.4"  # Spegel v0.7.4
PRE_V010_KEYS = {"registries", "additionalMirrorRegistries", "appendMirrors"}


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def one(path: Path) -> dict[str, Any]:
    docs = documents(path)
    assert len(docs) == 1, path
    return docs[0]


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return {
        "oci": one(APP_DIR / "app" / "ocirepository.yaml"),
        "hr": one(APP_DIR / "app" / "helmrelease.yaml"),
        "kustomization": one(APP_DIR / "app" / "kustomization.yaml"),
        "ks": one(APP_DIR / "ks.yaml"),
    }


def test_every_yaml_file_parses() -> None:
    files = sorted(FLUX.rglob("*.yaml")) + sorted(FLUX.rglob("*.yml"))
    assert len(files) >= 4
    for path in files:
        for doc in documents(path):
            assert isinstance(doc, dict), path
            assert "apiVersion" in doc and "kind" in doc, path


def test_kinds_and_api_versions(manifests: dict[str, dict[str, Any]]) -> None:
    got = {k: (m["apiVersion"], m["kind"]) for k, m in manifests.items()}
    assert got == {
        "oci": ("source.toolkit.fluxcd.io/v1", "OCIRepository"),
        "hr": ("helm.toolkit.fluxcd.io/v2", "HelmRelease"),
        "kustomization": ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
        "ks": ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"),
    }


def test_chart_is_pinned_to_spegel_v0_7_4(manifests: dict[str, dict[str, Any]]) -> None:
    oci = manifests["oci"]["spec"]
    assert oci["url"] == "oci://ghcr.io/spegel-org/helm-charts/spegel"
    assert oci["ref"] == {"tag": CHART_TAG}
    assert (
        oci["layerSelector"]["mediaType"] == "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
    )
    chart_ref = manifests["hr"]["spec"]["chartRef"]
    assert chart_ref == {"kind": "OCIRepository", "name": manifests["oci"]["metadata"]["name"]}


def test_kustomizations_point_at_the_files(manifests: dict[str, dict[str, Any]]) -> None:
    app = manifests["kustomization"]
    assert app["namespace"] == "kube-system"
    for resource in app["resources"]:
        assert (APP_DIR / "app" / resource).is_file(), resource
    ks = manifests["ks"]["spec"]
    assert (FLUX / ks["path"]).resolve() == (APP_DIR / "app").resolve()
    assert ks["prune"] is True
    assert ks["sourceRef"]["kind"] == "GitRepository"
    assert {"name": "cilium"} in ks["dependsOn"]


def test_values_use_current_chart_keys(manifests: dict[str, dict[str, Any]]) -> None:
    values = manifests["hr"]["spec"]["values"]
    assert not PRE_V010_KEYS & set(values["spegel"]), "pre-v0.1.0 chart keys"
    assert values["spegel"]["containerdMirrorAdd"] is False
    assert values["serviceMonitor"] == {"enabled": True}
    assert values["service"]["registry"]["hostPort"] == 29999


def test_values_agree_with_spegel_node_helm_values_on_k3s(
    manifests: dict[str, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same config on a k3s node: every value spegel-node prints is in the HelmRelease."""
    values = manifests["hr"]["spec"]["values"]
    root = tmp_path / "node"
    fake_nodes.make_k3s(root)
    config = tmp_path / "config.toml"
    config.write_text(
        f"registries = {json.dumps(values['spegel']['mirroredRegistries'])}\n"
        f"host_port = {values['service']['registry']['hostPort']}\n"
        f"resolve_tags = {json.dumps(values['spegel']['resolveTags'])}\n"
    )
    result = run_cli(
        capsys, "helm-values", "--root", str(root), "--config", str(config), "--output", "json"
    )
    assert result.code == 0, result.err
    expected = json.loads(result.out)
    assert expected["spegel"]["containerdSock"] == "/run/k3s/containerd/containerd.sock"
    for key, value in expected["spegel"].items():
        assert values["spegel"].get(key) == value, key
    assert values["service"]["registry"]["hostPort"] == expected["service"]["registry"]["hostPort"]


def test_values_agree_with_the_ansible_role_defaults(
    manifests: dict[str, dict[str, Any]],
) -> None:
    defaults = yaml.safe_load(ROLE_DEFAULTS.read_text())
    values = manifests["hr"]["spec"]["values"]
    assert values["service"]["registry"]["hostPort"] == defaults["spegel_node_host_port"]
    assert values["spegel"]["mirroredRegistries"] == defaults["spegel_node_registries"]
    assert values["spegel"]["resolveTags"] == defaults["spegel_node_resolve_tags"]
    assert not defaults["spegel_node_extra_mirrors"]
    assert "additionalMirrorTargets" not in values["spegel"]


def test_talos_alternative_matches_spegel_node_for_talos(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The commented Talos paths are what spegel-node prints on a Talos node."""
    text = (APP_DIR / "app" / "helmrelease.yaml").read_text()
    commented = yaml.safe_load(
        "\n".join(
            line.strip().removeprefix("# ")
            for line in text.splitlines()
            if line.strip().startswith("# containerd")
        )
    )
    fake_nodes.make_talos(tmp_path)
    result = run_cli(capsys, "helm-values", "--root", str(tmp_path), "--output", "json")
    assert result.code == 0, result.err
    expected = json.loads(result.out)["spegel"]
    for key in ("containerdSock", "containerdRegistryConfigPath", "containerdContentPath"):
        assert commented[key] == expected[key], key

"""The spegel-node DaemonSets for Flux (docs/flux/.../spegel-node/): valid against the Kubernetes
JSON schemas (kubernetes-validate, offline, strict), privileges only as needed, and consistent
with Spegel's HelmRelease and with what spegel-node itself detects and prints on those nodes.

The pod-view tests build a node root from the DaemonSet's hostPath mounts alone (each mounted
at /host + its path, as the pod sees them) and run spegel-node on it: what the pod sees must be
enough for `apply` (k3s) and for `doctor` (Talos, Bottlerocket), and give the same layout as
the whole node."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support import fake_nodes
from support.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
FLUX = REPO / "docs" / "flux"
APPS = FLUX / "kubernetes" / "main" / "apps" / "kube-system"
APP = APPS / "spegel-node" / "app"
HELMRELEASE = APPS / "spegel" / "app" / "helmrelease.yaml"
# Kubernetes minors to validate against: an older supported one and the newest schema shipped.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
MAKERS = {
    "talos": fake_nodes.make_talos,
    "bottlerocket": fake_nodes.make_bottlerocket,
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def generated_configmaps() -> list[dict[str, Any]]:
    """The ConfigMaps kustomize's configMapGenerator makes (without the hash suffix)."""
    kustomization = documents(APP / "kustomization.yaml")[0]
    maps = []
    for gen in kustomization["configMapGenerator"]:
        data = {Path(f).name: (APP / f).read_text() for f in gen["files"]}
        maps.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"], "namespace": kustomization["namespace"]},
                "data": data,
            }
        )
    return maps


@pytest.fixture(scope="module")
def daemonsets() -> dict[str, dict[str, Any]]:
    kustomization = documents(APP / "kustomization.yaml")[0]
    found = {}
    for resource in kustomization["resources"]:
        for doc in documents(APP / resource):
            assert doc["kind"] == "DaemonSet", resource
            found[doc["metadata"]["name"]] = doc
    return found


def pod(ds: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = ds["spec"]["template"]["spec"]
    return spec


def container(ds: dict[str, Any]) -> dict[str, Any]:
    containers = pod(ds)["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def host_mounts(ds: dict[str, Any]) -> list[tuple[str, str, bool, str]]:
    """(host path, mount path, read-only, hostPath type) for every hostPath volume."""
    volumes = {v["name"]: v for v in pod(ds)["volumes"]}
    out = []
    for m in container(ds)["volumeMounts"]:
        hp = volumes[m["name"]].get("hostPath")
        if hp is not None:
            out.append((hp["path"], m["mountPath"], bool(m.get("readOnly")), hp["type"]))
    return out


def test_the_set_is_the_three_daemonsets(daemonsets: dict[str, dict[str, Any]]) -> None:
    assert set(daemonsets) == {
        "spegel-node",
        "spegel-node-doctor-talos",
        "spegel-node-doctor-bottlerocket",
    }
    ks = documents(APP.parent / "ks.yaml")[0]
    assert (FLUX / ks["spec"]["path"]).resolve() == APP.resolve()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_valid_against_the_kubernetes_schemas(
    daemonsets: dict[str, dict[str, Any]], version: str
) -> None:
    for doc in [*daemonsets.values(), *generated_configmaps()]:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_a_mistake(daemonsets: dict[str, dict[str, Any]]) -> None:
    broken = json.loads(json.dumps(daemonsets["spegel-node"]))
    pod(broken)["tolerations"][0]["opertor"] = "Exists"  # a typo: strict schemas reject it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_every_node_and_node_critical(daemonsets: dict[str, dict[str, Any]]) -> None:
    for ds in daemonsets.values():
        spec = pod(ds)
        assert spec["tolerations"] == [{"operator": "Exists"}]
        assert spec["priorityClassName"] == "system-node-critical"
        assert spec["hostNetwork"] is True
        assert spec["automountServiceAccountToken"] is False
        assert "hostPID" not in spec and "hostIPC" not in spec


def test_privileges_only_as_needed(daemonsets: dict[str, dict[str, Any]]) -> None:
    for name, ds in daemonsets.items():
        sc = container(ds)["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, name  # nothing added back
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # apply writes root's files on the node: uid 0 (the image's default is 65532)
    assert container(daemonsets["spegel-node"])["securityContext"]["runAsUser"] == 0
    for name in ("spegel-node-doctor-talos", "spegel-node-doctor-bottlerocket"):
        psc = pod(daemonsets[name])["securityContext"]
        assert psc["runAsUser"] == 65532 and psc["runAsNonRoot"] is True


def test_apply_writes_only_the_hosts_dir_and_its_state(
    daemonsets: dict[str, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nodes.make_k3s(tmp_path)
    result = run_cli(capsys, "detect", "--root", str(tmp_path), "-o", "json")
    layout = json.loads(result.out)
    mounts = host_mounts(daemonsets["spegel-node"])
    for host, mount, _, _ in mounts:
        assert mount == "/host" + host
    writable = {host for host, _, ro, _ in mounts if not ro}
    assert writable == {layout["hosts_dir"], "/var/lib/spegel-node"}
    read_only = [host for host, _, ro, _ in mounts if ro]
    assert any(layout["containerd_config"].startswith(d + "/") for d in read_only)
    assert all(not layout["containerd_socket"].startswith(h) for h, *_ in mounts)  # not needed
    args = container(daemonsets["spegel-node"])["args"]
    assert args[:3] == ["run", "--root", "/host"] and "--doctor-only" not in args


def test_doctor_variants_are_read_only_on_their_nodes(
    daemonsets: dict[str, dict[str, Any]],
) -> None:
    apply_terms = pod(daemonsets["spegel-node"])["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    (expr,) = apply_terms[0]["matchExpressions"]
    assert expr["operator"] == "NotIn" and sorted(expr["values"]) == sorted(MAKERS)
    for os_id in MAKERS:
        ds = daemonsets[f"spegel-node-doctor-{os_id}"]
        assert pod(ds)["nodeSelector"] == {expr["key"]: os_id}
        assert all(ro for _, _, ro, _ in host_mounts(ds))
        args = container(ds)["args"]
        assert args[:4] == ["run", "--doctor-only", "--root", "/host"]


def pod_view(node: Path, ds: dict[str, Any], view: Path) -> Path:
    """A root holding only what the DaemonSet mounts of `node`, where the pod sees it."""
    for host, mount, _, kind in host_mounts(ds):
        src, dst = node / host.lstrip("/"), view / mount.removeprefix("/host").lstrip("/")
        if kind == "DirectoryOrCreate" and not src.exists():
            src.mkdir(parents=True)
        assert src.exists() or kind.endswith("OrCreate"), f"{host} missing: the pod would fail"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    return view


def config_args() -> list[str]:
    return ["--config", str(APP / "config.toml")]


def test_the_k3s_pod_view_is_enough_for_apply(
    daemonsets: dict[str, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = tmp_path / "node"
    fake_nodes.make_k3s(node)
    view = pod_view(node, daemonsets["spegel-node"], tmp_path / "view")
    whole = json.loads(run_cli(capsys, "detect", "--root", str(node), "-o", "json").out)
    seen = run_cli(capsys, "detect", "--root", str(view), "-o", "json")
    assert seen.code == 0, seen.err
    got = json.loads(seen.out)
    for key in ("flavor", "hosts_dir", "containerd_config", "config_path_set", "distro_owned"):
        assert got[key] == whole[key], key
    applied = run_cli(capsys, "apply", "--root", str(view), "--no-gate", *config_args())
    assert applied.code == 0, applied.err
    hosts = view / whole["hosts_dir"].lstrip("/") / "ghcr.io/hosts.toml"
    assert hosts.read_text().startswith("# managed by spegel-node")


@pytest.mark.parametrize("os_id", sorted(MAKERS))
def test_the_doctor_pod_view_sees_the_node(
    os_id: str,
    daemonsets: dict[str, dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node = tmp_path / "node"
    MAKERS[os_id](node)
    view = pod_view(node, daemonsets[f"spegel-node-doctor-{os_id}"], tmp_path / "view")
    whole = json.loads(run_cli(capsys, "detect", "--root", str(node), "-o", "json").out)
    got = json.loads(run_cli(capsys, "detect", "--root", str(view), "-o", "json").out)
    for key in ("flavor", "containerd_socket", "containerd_config", "hosts_dir", "distro_owned"):
        assert got[key] == whole[key], key
    assert got["distro_owned"] is True
    doctor = run_cli(capsys, "doctor", "--root", str(view), "-o", "json", *config_args())
    assert doctor.code in (0, 1), doctor.err
    checks = {c["id"]: c["status"] for c in json.loads(doctor.out)["checks"]}
    assert checks["layout.detected"] == "pass"
    refused = run_cli(capsys, "apply", "--root", str(view), "--no-gate", *config_args())
    assert refused.code == 1  # apply refuses there: the doctor variant is the one to run


def test_config_agrees_with_the_helmrelease_and_helm_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], daemonsets: dict[str, dict[str, Any]]
) -> None:
    config = tomllib.loads((APP / "config.toml").read_text())
    values = documents(HELMRELEASE)[0]["spec"]["values"]
    assert values["spegel"]["containerdMirrorAdd"] is False
    assert config["registries"] == values["spegel"]["mirroredRegistries"]
    assert config["host_port"] == values["service"]["registry"]["hostPort"]
    assert config["resolve_tags"] == values["spegel"]["resolveTags"]
    assert config["node_ip"] == "auto"  # with hostNetwork: the node's address
    # what spegel-node prints for Spegel on that k3s node, from this very config file
    fake_nodes.make_k3s(tmp_path)
    result = run_cli(
        capsys, "helm-values", "--root", str(tmp_path), *config_args(), "--output", "json"
    )
    assert result.code == 0, result.err
    expected = json.loads(result.out)
    for key, value in expected["spegel"].items():
        assert values["spegel"].get(key) == value, key
    assert expected["service"]["registry"]["hostPort"] == config["host_port"]
    # the DaemonSet writes the hosts dir Spegel's chart is told about
    writable = {h for h, _, ro, _ in host_mounts(daemonsets["spegel-node"]) if not ro}
    assert expected["spegel"]["containerdRegistryConfigPath"] in writable


def test_config_is_mounted_where_args_read_it(daemonsets: dict[str, dict[str, Any]]) -> None:
    (cm,) = generated_configmaps()
    for ds in daemonsets.values():
        c = container(ds)
        volumes = {v["name"]: v for v in pod(ds)["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        args = c["args"]
        config = Path(args[args.index("--config") + 1])
        mount = mounts[str(config.parent)]
        assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
        assert config.name in cm["data"]
        ready = Path(args[args.index("--ready-file") + 1])
        assert "emptyDir" in volumes[mounts[str(ready.parent)]["name"]]
        probe = c["startupProbe"]["exec"]["command"]
        assert probe[0] == "/usr/bin/python3.11" and f"'{ready}'" in probe[-1]
        assert "livenessProbe" not in c and "readinessProbe" not in c  # no periodic exec

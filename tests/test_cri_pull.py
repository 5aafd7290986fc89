"""The kubelet's path: a CRI PullImage (`crictl pull`) on each containerd peer, hosts.toml read
by the daemon from `config_path` (not `ctr --hosts-dir`), and the registries' access logs
proving which host served."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.peers import CONTAINERD_VERSIONS
from support.sandbox import Request, Sandbox


def _fetched(requests: list[Request]) -> bool:
    return any("/manifests/" in r.path for r in requests) and any(
        "/blobs/" in r.path for r in requests
    )


@pytest.mark.parametrize("version", CONTAINERD_VERSIONS.values())
def test_crictl_pull_is_served_by_the_mirror(version: str) -> None:
    with Sandbox(containerd_version=version) as sb:
        assert sb.containerd.version.startswith(version), sb.containerd.version
        sb.write_mirror_first()
        up, mirror = sb.upstream.mark(), sb.spegel.mark()
        result = sb.crictl_pull()
        assert result.returncode == 0, result.stderr[-2000:]
        served = sb.spegel.containerd_requests(since=mirror)
        assert _fetched(served), served
        assert all(r.user_agent.startswith(f"containerd/{version}") for r in served)
        assert sb.upstream.containerd_requests(since=up) == []


def test_crictl_pull_without_hosts_toml_goes_upstream() -> None:
    """The control: the same pull with no hosts.toml reaches upstream, never the mirror."""
    with Sandbox(containerd_version=CONTAINERD_VERSIONS["2.3"]) as sb:
        up, mirror = sb.upstream.mark(), sb.spegel.mark()
        result = sb.crictl_pull()
        assert result.returncode == 0, result.stderr[-2000:]
        assert _fetched(sb.upstream.containerd_requests(since=up))
        assert sb.spegel.containerd_requests(since=mirror) == []


TRANSFER_SINCE = [v for k, v in CONTAINERD_VERSIONS.items() if k >= "2.1"]


def _doctor_local_pull_check(sb: Sandbox) -> dict[str, str]:
    """doctor's containerd.local_image_pull against this live containerd (its socket and config)."""
    result = subprocess.run(
        [sys.executable, "-m", "spegel_node", "doctor", "-o", "json",
         "--containerd-socket", str(sb.containerd.socket),
         "--containerd-config", str(sb.containerd.config_path),
         "--hosts-dir", str(sb.hosts_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    return checks["containerd.local_image_pull"]


def _apply_warnings(sb: Sandbox) -> list[str]:
    """`apply --dry-run` against this live containerd: its warnings (a dry run writes nothing,
    not even the lock or the state on this machine)."""
    config = sb.root / "spegel-node.toml"
    config.write_text(f'node_ip = "127.0.0.1"\nregistries = ["http://{sb.upstream.host}"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "spegel_node", "apply", "--dry-run", "--no-gate", "-o", "json",
         "--config", str(config),
         "--containerd-socket", str(sb.containerd.socket),
         "--containerd-config", str(sb.containerd.config_path),
         "--hosts-dir", str(sb.hosts_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout)["warnings"])


def _multi_root_pull(
    version: str, extra: str
) -> tuple[list[Request], list[Request], dict[str, str]]:
    """A CRI pull with `config_path = "<hosts>:<empty root>"`; (mirror, upstream) requests and
    what doctor says of it (with `apply_warnings`: what apply warns)."""
    with Sandbox(containerd_version=version) as sb:
        other = sb.root / "more-certs.d"
        other.mkdir()
        sb.containerd.stop()
        sb.containerd.config_path_value = f"{sb.hosts_dir}:{other}"
        sb.containerd.config_extra = extra
        sb.containerd.start()
        sb.write_mirror_first()
        up, mirror = sb.upstream.mark(), sb.spegel.mark()
        result = sb.crictl_pull()
        assert result.returncode == 0, result.stderr[-2000:]
        verdict = _doctor_local_pull_check(sb)
        verdict["apply_warnings"] = "\n".join(_apply_warnings(sb))
        return (
            sb.spegel.containerd_requests(since=mirror),
            sb.upstream.containerd_requests(since=up),
            verdict,
        )


LOCAL_PULL = '\n[plugins."io.containerd.cri.v1.images"]\n  use_local_image_pull = true\n'


@pytest.mark.parametrize("version", TRANSFER_SINCE)
def test_multi_root_config_path_is_ignored_by_the_transfer_service(version: str) -> None:
    """containerd #12415/#12636: on 2.1+ CRI pulls through the transfer service, which reads
    one hosts root only: with several roots in config_path no hosts.toml is read."""
    mirror, upstream, verdict = _multi_root_pull(version, "")
    assert mirror == [] and _fetched(upstream), (mirror, upstream)
    assert verdict["status"] == "fail" and "2 roots" in verdict["summary"], verdict
    assert "use_local_image_pull = true" in verdict["remediation"]
    warning = verdict["apply_warnings"]  # apply says so too, from doctor's check
    assert f"containerd {version}" in warning and "will not be read for Kubernetes" in warning


@pytest.mark.parametrize("version", TRANSFER_SINCE)
def test_multi_root_config_path_works_with_use_local_image_pull(version: str) -> None:
    """The fix doctor names (besides one root): `use_local_image_pull = true`."""
    mirror, upstream, verdict = _multi_root_pull(version, LOCAL_PULL)
    assert _fetched(mirror) and upstream == [], (mirror, upstream)
    assert verdict["status"] == "pass", verdict
    assert "transfer service" not in verdict["apply_warnings"]


@pytest.mark.parametrize("version", [v for v in CONTAINERD_VERSIONS.values() if v < "2.1"])
def test_multi_root_config_path_works_before_the_transfer_service(version: str) -> None:
    mirror, upstream, verdict = _multi_root_pull(version, "")
    assert _fetched(mirror) and upstream == [], (mirror, upstream)
    assert verdict["status"] == "skip", verdict  # no transfer-service pulls before 2.1

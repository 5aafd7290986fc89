"""The kubelet's path: a CRI PullImage (`crictl pull`) on each containerd peer, hosts.toml read
by the daemon from `config_path` (not `ctr --hosts-dir`), and the registries' access logs
proving which host served."""

from __future__ import annotations

import subprocess

import pytest
from support.peers import CONTAINERD_VERSIONS, peer_bin
from support.sandbox import Request, Sandbox


def _crictl_pull(sb: Sandbox) -> subprocess.CompletedProcess[str]:
    endpoint = f"unix://{sb.containerd.socket}"
    cmd = [str(peer_bin("crictl")), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint]
    return subprocess.run(
        [*cmd, "pull", sb.image_ref], capture_output=True, text=True, timeout=120, check=False
    )


def _fetched(requests: list[Request]) -> bool:
    return any("/manifests/" in r.path for r in requests) and any(
        "/blobs/" in r.path for r in requests
    )


@pytest.mark.parametrize("version", CONTAINERD_VERSIONS.values())
def test_crictl_pull_is_served_by_the_mirror(version: str) -> None:
    with Sandbox(containerd_version=version) as sb:
        assert sb.containerd.version.startswith(version), sb.containerd.version
        sb.write_hosts_toml(
            f'server = "{sb.upstream.url}"\n\n'
            f'[host."{sb.spegel.url}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        up, mirror = sb.upstream.mark(), sb.spegel.mark()
        result = _crictl_pull(sb)
        assert result.returncode == 0, result.stderr[-2000:]
        served = sb.spegel.containerd_requests(since=mirror)
        assert _fetched(served), served
        assert all(r.user_agent.startswith(f"containerd/{version}") for r in served)
        assert sb.upstream.containerd_requests(since=up) == []


def test_crictl_pull_without_hosts_toml_goes_upstream() -> None:
    """The control: the same pull with no hosts.toml reaches upstream, never the mirror."""
    with Sandbox(containerd_version=CONTAINERD_VERSIONS["2.3"]) as sb:
        up, mirror = sb.upstream.mark(), sb.spegel.mark()
        result = _crictl_pull(sb)
        assert result.returncode == 0, result.stderr[-2000:]
        assert _fetched(sb.upstream.containerd_requests(since=up))
        assert sb.spegel.containerd_requests(since=mirror) == []

"""The health gate against real Spegel 0.7.3 and real CRI pulls: Spegel on B killed, restarted,
and hung (a listener in its place that accepts and never answers), on containerd 2.3.7 (the
cluster) and on Debian's containerd 1.6.20 (one sandbox node on loopback; it cannot run Spegel,
a hung listener needs none). Timings go to `make bench`; here only what happened."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import fake_nodes
from support.p2p import HungListener, Node, P2PCluster, applied_cluster, upstream_blob_fetches
from support.peers import peer_bin
from support.sandbox import HangingServer, Sandbox, sandbox_on_fake_node, wait_until

pytestmark = pytest.mark.p2p

GATE_FAILURES = 3
APPLY = [sys.executable, "-m", "spegel_node", "apply"]
HUNG_WAIT_S = 5.0  # an upstream pull of these images takes ~0.1 s here


@pytest.fixture(scope="module")
def cluster() -> Iterator[P2PCluster]:
    with applied_cluster() as c:
        yield c


def pulled_by_a(cluster: P2PCluster, repo: str) -> str:
    ref = cluster.push_image(repo=repo)
    result, _ = cluster.node("a").pull(ref)
    assert result.returncode == 0, result.stderr
    return ref


def blobs_from(cluster: P2PCluster, node: Node) -> list[str]:
    return [f.path for f in upstream_blob_fetches(cluster) if f.remote == node.ip]


def withdraw(node: Node) -> None:
    """`apply` until the gate withdraws the mirror: exactly GATE_FAILURES probes."""
    for attempt in range(1, GATE_FAILURES + 1):
        assert node.mirror in node.hosts_toml()
        result = node.apply()
        assert result.returncode == 0, result.stderr
        assert f"({attempt} failures in a row)" in result.stdout
    assert "mirror withdrawn" in result.stdout
    assert "gate: withdrawing mirror" in result.stderr
    assert node.mirror not in node.hosts_toml()
    assert f"http://{node.cluster.upstream.host}" in node.hosts_toml()  # upstream stays


def test_killed_spegel_is_withdrawn_b_pulls_upstream_then_peers_serve_again(
    cluster: P2PCluster,
) -> None:
    b = cluster.node("b")
    first = pulled_by_a(cluster, "gate/killed")
    b.spegel.kill()
    withdraw(b)

    cluster.upstream.mark()
    result, _ = b.pull(first)
    assert result.returncode == 0, result.stderr
    cluster.upstream_logged()
    assert len(blobs_from(cluster, b)) == 4  # config + 3 layers, from upstream

    b.spegel.start()
    back = b.apply()
    assert back.returncode == 0, back.stderr
    assert "answers again; restoring it" in back.stderr
    assert b.mirror in b.hosts_toml()

    second = pulled_by_a(cluster, "gate/restored")
    cluster.wait_resolvable(b, second)
    cluster.upstream.mark()
    result, _ = b.pull(second)
    assert result.returncode == 0, result.stderr
    cluster.upstream_logged()
    assert blobs_from(cluster, b) == []


def crictl_pull(node: Node, ref: str) -> subprocess.Popen[str]:
    argv = [str(peer_bin("crictl")), "--runtime-endpoint", f"unix://{node.socket}"]
    argv += ["--image-endpoint", f"unix://{node.socket}", "pull", ref]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_stuck_on(connections: Callable[[], int], pull: subprocess.Popen[str]) -> None:
    """containerd connects to the hung mirror, and the pull is still waiting on it HUNG_WAIT_S
    later (then it is killed)."""
    before = connections()
    try:
        wait_until(lambda: connections() > before, "containerd connecting to the hung mirror", 30)
        with pytest.raises(subprocess.TimeoutExpired):
            pull.wait(timeout=HUNG_WAIT_S)
    finally:
        pull.kill()
        pull.communicate()


def test_hung_spegel_2_3_stalls_the_pull_without_gate_not_with_it(cluster: P2PCluster) -> None:
    b = cluster.node("b")
    if not b.spegel.running:
        b.spegel.start()
    stalled, gated = pulled_by_a(cluster, "gate/hung-nogate"), pulled_by_a(cluster, "gate/hung")
    b.spegel.stop()
    try:
        with HungListener(b) as hung:
            keep = b.apply("--no-gate")
            assert keep.returncode == 0, keep.stderr
            assert b.mirror in b.hosts_toml()
            # dial_timeout = "200ms" is in the file, but the listener accepts: the dial succeeds
            # and containerd waits for an answer that never comes.
            assert 'dial_timeout = "200ms"' in b.hosts_toml()
            assert_stuck_on(lambda: hung.accepted, crictl_pull(b, stalled))

            withdraw(b)
            before = hung.accepted
            cluster.upstream.mark()
            result, _ = b.pull(gated)
            assert result.returncode == 0, result.stderr
            assert hung.accepted == before  # containerd never asked the hung mirror
            cluster.upstream_logged()
            assert len(blobs_from(cluster, b)) == 4
    finally:
        b.spegel.start()
        b.apply()


@pytest.fixture
def node_1_6(tmp_path: Path) -> Iterator[tuple[Sandbox, Path]]:
    """Debian's containerd 1.6.20 (CRI on) reading the hosts dir of a fake node tree that
    `spegel-node apply --root` manages."""
    root = tmp_path / "node"
    with sandbox_on_fake_node(root) as sandbox:
        yield sandbox, root


def test_hung_mirror_1_6_stalls_the_pull_without_gate_not_with_it(
    node_1_6: tuple[Sandbox, Path], hanging_server: HangingServer
) -> None:
    sandbox, root = node_1_6
    fake_nodes.write(
        root,
        "/etc/spegel-node/config.toml",
        f'node_ip = "127.0.0.1"\nhost_port = {hanging_server.port}\n'
        f'registries = ["{sandbox.upstream.url}"]\ngate_failures = {GATE_FAILURES}\n',
    )
    assert sandbox.containerd.version.startswith("1.6.")

    def apply(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*APPLY, "--root", str(root), *args], capture_output=True, text=True, check=False
        )

    hosts = root / "etc/containerd/certs.d" / sandbox.upstream.host / "hosts.toml"
    assert apply("--no-gate").returncode == 0
    assert hanging_server.url in hosts.read_text()
    endpoint = f"unix://{sandbox.containerd.socket}"
    argv = [str(peer_bin("crictl")), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint]
    stalled = subprocess.Popen(
        [*argv, "pull", sandbox.image_ref],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert_stuck_on(lambda: hanging_server.connections, stalled)

    for _ in range(GATE_FAILURES):
        assert apply().returncode == 0
    assert hanging_server.url not in hosts.read_text()
    other = sandbox.push_image("sandbox/gated")
    before = hanging_server.connections
    up = sandbox.upstream.mark()
    done = subprocess.run(
        [*argv, "pull", other], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert hanging_server.connections == before
    assert any("/blobs/" in r.path for r in sandbox.upstream.containerd_requests(since=up))

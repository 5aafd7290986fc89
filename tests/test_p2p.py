"""Three nodes, real Spegel 0.7.3, real containerd 2.3.7, real CRI pulls (crictl)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.p2p import P2PCluster

pytestmark = pytest.mark.p2p


@pytest.fixture(scope="module")
def cluster() -> Iterator[P2PCluster]:
    with P2PCluster() as c:
        yield c


def test_b_and_c_pull_from_a_not_from_upstream(cluster: P2PCluster) -> None:
    ref = cluster.push_image(layers=3)
    for node in cluster.nodes:
        result = node.apply()
        assert result.returncode == 0, result.stderr
        assert node.mirror in node.hosts_toml()
    a, b, c = (cluster.node(n) for n in "abc")
    cluster.upstream.mark()
    result, _ = a.pull(ref)
    assert result.returncode == 0, result.stderr
    from_a = cluster.upstream.wait_for_requests(
        lambda reqs: sum("/blobs/" in r.path for r in reqs) >= 4
    )
    assert sum("/blobs/" in r.path for r in from_a) >= 4  # config + 3 layers
    cluster.wait_resolvable(b, ref)
    cluster.wait_resolvable(c, ref)
    cluster.upstream.mark()
    for node in (b, c):
        result, _ = node.pull(ref)
        assert result.returncode == 0, result.stderr
    cluster.upstream_logged()
    blobs = [r for r in cluster.upstream.requests() if "/blobs/" in r.path]
    assert blobs == []
    assert a.mirror_served() > 0

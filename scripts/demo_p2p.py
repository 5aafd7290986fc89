#!/usr/bin/env python3
"""`make demo-p2p`: three nodes sharing an image peer to peer through real Spegel.

It builds three nodes, each a network namespace of its own (10.213.0.11-13 on a bridge), with
its own containerd 2.3.7 and its own Spegel 0.7.3, and `spegel-node apply` writing each node's
hosts.toml; one upstream registry (10.213.0.1:5000) keeps an access log. Then: node A pulls an
image (upstream serves it), B and C pull it (Spegel serves it from A; the access log shows no
blob request from B or C), `spegel-node doctor --image` on B, and the health gate withdrawing
B's mirror when its Spegel is killed. Every outcome is read from the access log, not assumed.

Needs root and the test peers (`make peers`). Everything it starts is stopped and removed at the
end, also on failure or Ctrl-C. Exit status 0 when every expected outcome happened, 1 otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("PYTHONPATH", str(REPO / "src"))

from peers.build import CACHE  # noqa: E402
from support.p2p import P2PCluster, upstream_blob_fetches  # noqa: E402
from support.sandbox import missing_binaries  # noqa: E402

NEEDED = ("crictl-1.34.0/bin/crictl", "spegel-0.7.3/bin/spegel", "containerd-2.3.7/bin/containerd")


class Failed(Exception):
    """An expected outcome did not happen."""


def preflight() -> str:
    if os.geteuid() != 0:
        return "the demo needs root (network namespaces, containerd)"
    missing = [p for p in NEEDED if not (CACHE / p).is_file()] + missing_binaries()
    return f"missing {', '.join(missing)}: run `make peers`" if missing else ""


def blob_summary(cluster: P2PCluster) -> dict[str, tuple[int, int]]:
    """Per node: (blob requests, bytes) upstream logged since its last mark."""
    fetches = upstream_blob_fetches(cluster)
    return {
        n.name: (
            sum(f.remote == n.ip for f in fetches),
            sum(f.size for f in fetches if f.remote == n.ip),
        )
        for n in cluster.nodes
    }


def story(cluster: P2PCluster, out: Callable[[str], None]) -> None:
    def step(text: str) -> None:
        out(f"\n==> {text}")

    def expect(ok: bool, good: str, bad: str) -> None:
        out(f"    {'ok' if ok else 'FAILED'}: {good if ok else bad}")
        if not ok:
            raise Failed(bad)

    a, b, c = (cluster.node(n) for n in "abc")
    step("spegel-node apply on every node: the hosts.toml puts the node's own Spegel first")
    for node in cluster.nodes:
        done = node.apply()
        expect(
            done.returncode == 0,
            f"node {node.name.upper()}: {done.stdout.splitlines()[0]}",
            done.stderr,
        )
    out("    node B's hosts.toml:")
    for line in b.hosts_toml().splitlines():
        out(f"      {line}")

    step("push a 3-layer image (3 x 1 MiB) to upstream")
    ref = cluster.push_image("demo/shared", layers=3)
    out(f"    {ref}")

    step("node A pulls it (crictl pull, the kubelet's path): nobody has it yet, upstream serves")
    cluster.upstream.mark()
    result, seconds = a.pull(ref)
    expect(result.returncode == 0, f"pulled in {seconds:.2f} s", result.stderr[-300:])
    cluster.upstream_logged()
    blobs, size = blob_summary(cluster)["a"]
    expect(blobs >= 4, f"upstream served A {blobs} blobs, {size} bytes", "A got no blobs")

    step("nodes B and C pull it: their Spegel finds it on A")
    cluster.wait_resolvable(b, ref)
    cluster.wait_resolvable(c, ref)
    cluster.upstream.mark()
    for node in (b, c):
        result, seconds = node.pull(ref)
        expect(
            result.returncode == 0,
            f"node {node.name.upper()} pulled in {seconds:.2f} s",
            result.stderr[-300:],
        )
    cluster.upstream_logged()  # every request answered so far is in the log
    summary = blob_summary(cluster)
    out("    the access-log proof (upstream blob requests since A's pull):")
    for name in ("b", "c"):
        count, size = summary[name]
        out(
            f"      node {name.upper()} ({cluster.node(name).ip}): {count} upstream blob requests, "
            f"{size} bytes"
        )
    expect(
        summary["b"][0] == 0 and summary["c"][0] == 0,
        "0 upstream blob requests from B and C",
        f"B and C still fetched blobs upstream: {summary}",
    )
    served = a.mirror_served()
    expect(served > 0, f"Spegel on A served {served:.0f} requests to its peers", "A served none")

    step(f"spegel-node doctor --image {ref} on node B")
    done = b.spegel_node("doctor", "--image", ref)
    for line in done.stdout.splitlines():
        if "spegel." in line:
            out(f"    {line.strip()}")
    expect(done.returncode == 0, "doctor exits 0: a peer has it", f"doctor exit {done.returncode}")

    step("Spegel on B dies: apply (the repair timer) withdraws the mirror after 3 failed probes")
    b.spegel.kill()
    for _ in range(3):
        done = b.apply()
        out(f"    {done.stdout.splitlines()[0]}")
    expect(b.mirror not in b.hosts_toml(), "B's hosts.toml names upstream only", b.hosts_toml())
    b.forget(ref)
    cluster.upstream.mark()
    result, seconds = b.pull(ref)
    expect(result.returncode == 0, f"B pulls straight from upstream in {seconds:.2f} s", "failed")
    cluster.upstream_logged()
    count, size = blob_summary(cluster)["b"]
    expect(count >= 4, f"upstream access log: {count} blob requests from B, {size} bytes", "none")

    step("Spegel on B is back: the next apply restores the mirror")
    b.spegel.start()
    done = b.apply()
    expect(b.mirror in b.hosts_toml(), done.stdout.splitlines()[0], done.stderr)


def main(out: Callable[[str], None] = print) -> int:
    reason = preflight()
    if reason:
        out(f"demo-p2p: {reason}")
        return 1
    began = time.monotonic()
    out("==> starting three nodes (network namespaces, containerd 2.3.7, Spegel 0.7.3) ...")
    try:
        with P2PCluster() as cluster:
            out(
                f"    up: upstream {cluster.upstream.host}; nodes "
                + ", ".join(f"{n.name.upper()} {n.ip}" for n in cluster.nodes)
            )
            story(cluster, out)
    except Failed as e:
        out(f"\ndemo-p2p FAILED: {e}")
        return 1
    out(
        f"\ndemo-p2p: every outcome as expected ({time.monotonic() - began:.0f} s); "
        "everything stopped and removed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(lambda line: print(line, flush=True)))

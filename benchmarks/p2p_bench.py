"""P2P figures on the three-node cluster of tests/support/p2p.py (netns nodes, containerd 2.3.7,
real Spegel 0.7.3, spegel-node apply) and one Debian containerd 1.6.20 sandbox node:

- upstream bytes when A, B and C pull the same image with Spegel + spegel-node vs without;
- B's pull time from a peer vs from upstream (medians);
- B's pull time with Spegel stopped (refused) and `--no-gate`; and with Spegel hung (a listener
  on its hostPort that accepts and never answers), with the gate (mirror withdrawn) and with
  `--no-gate` (mirror kept; the pull is killed after --hung-cap seconds if it has not
  finished), on 2.3.7 and on 1.6.20.

    .venv/bin/python benchmarks/p2p_bench.py [--runs 5] [--layers 3] [--layer-mib 8] [--hung-cap 150]

Run by benchmarks/run.py (`make bench`) as its last section. Needs root and `make peers`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("PYTHONPATH", str(REPO / "src"))

from peers.build import CACHE  # noqa: E402
from support import fake_nodes  # noqa: E402
from support.p2p import (  # noqa: E402
    HungListener,
    Node,
    P2PCluster,
    upstream_blob_fetches,
)
from support.sandbox import HangingServer, Sandbox, missing_binaries, sandbox_on_fake_node  # noqa: E402

CRICTL = CACHE / "crictl-1.34.0/bin/crictl"
NEEDED = (
    CRICTL,
    CACHE / "spegel-0.7.3/bin/spegel",
    CACHE / "containerd-2.3.7/bin/containerd",
)
GATE_FAILURES = 3


@dataclass
class Figure:
    what: str
    value: str
    note: str = ""


def unavailable() -> str:
    """Why the p2p benchmark cannot run here ('' when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [str(p) for p in NEEDED if not p.is_file()] + missing_binaries()
    return f"missing {', '.join(missing)} (make peers; make installs the rest)" if missing else ""


def say(text: str) -> None:
    print(f"  .. {text}", flush=True)


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def timed_pull(node: Node, ref: str) -> float:
    result, seconds = node.pull(ref)
    if result.returncode != 0:
        raise RuntimeError(f"crictl pull {ref} on {node.name}: {result.stderr.strip()[-500:]}")
    return seconds


def without_mirror(node: Node) -> None:
    """The node as it is without Spegel: a hosts.toml naming upstream only (plain HTTP)."""
    path = node.hosts_dir / node.cluster.upstream.host / "hosts.toml"
    path.write_text(f'server = "http://{node.cluster.upstream.host}"\n')


def with_mirror(node: Node) -> None:
    result = node.apply()
    if result.returncode != 0 or node.mirror not in node.hosts_toml():
        raise RuntimeError(f"spegel-node apply on {node.name}: {result.stderr.strip()}")


def upstream_bytes(cluster: P2PCluster, ref: str) -> tuple[int, dict[str, int]]:
    """A, B, C pull `ref` one after the other; blob bytes upstream sent, in all and per node."""
    cluster.upstream.mark()
    a = cluster.node("a")
    timed_pull(a, ref)
    for node in cluster.nodes[1:]:
        if node.mirror in node.hosts_toml():
            cluster.wait_resolvable(node, ref)
        timed_pull(node, ref)
    cluster.upstream_logged()
    fetches = upstream_blob_fetches(cluster)
    per = {n.name: sum(f.size for f in fetches if f.remote == n.ip) for n in cluster.nodes}
    return sum(per.values()), per


def bench_cluster(args: argparse.Namespace, figures: list[Figure]) -> None:
    size = args.layer_mib << 20
    with P2PCluster() as cluster:
        say(f"cluster up: 3 nodes, image {args.layers} x {args.layer_mib} MiB layers")
        a, b, c = (cluster.node(n) for n in "abc")
        for node in cluster.nodes:
            with_mirror(node)
        ref = cluster.push_image("bench/shared", layers=args.layers, size=size)
        with_spegel, per = upstream_bytes(cluster, ref)
        say(f"with Spegel: upstream sent {mib(with_spegel)} ({per})")
        for node in cluster.nodes:
            without_mirror(node)
        ref = cluster.push_image("bench/plain", layers=args.layers, size=size)
        plain, per_plain = upstream_bytes(cluster, ref)
        say(f"without: upstream sent {mib(plain)} ({per_plain})")
        figures.append(
            Figure(
                "upstream bytes, A+B+C pull one image, Spegel + spegel-node",
                mib(with_spegel),
                f"A {mib(per['a'])}, B {mib(per['b'])}, C {mib(per['c'])}",
            )
        )
        figures.append(
            Figure(
                "upstream bytes, A+B+C pull one image, no mirror",
                mib(plain),
                f"{plain / with_spegel:.2f}x the above" if with_spegel else "",
            )
        )

        # pull time: B from a peer (A has it), C from upstream; interleaved, medians
        with_mirror(b)
        ref = cluster.push_image("bench/timing", layers=args.layers, size=size)
        timed_pull(a, ref)
        cluster.wait_resolvable(b, ref)
        peer, upstream = [], []
        for _ in range(args.runs):
            b.forget(ref)
            c.forget(ref)
            peer.append(timed_pull(b, ref))
            upstream.append(timed_pull(c, ref))
        figures.append(
            Figure("B pulls from a peer (median)", ms(statistics.median(peer)), runs(peer))
        )
        figures.append(
            Figure(
                "C pulls from upstream (median)", ms(statistics.median(upstream)), runs(upstream)
            )
        )
        say("pull times measured")

        # Spegel on B stopped (connection refused), mirror kept: the cost of a dead mirror
        dead_ref = cluster.push_image("bench/dead-nogate", layers=args.layers, size=size)
        b.spegel.stop()
        with_mirror_nogate(b)
        seconds, finished = capped_pull(b, dead_ref, args.hung_cap)
        figures.append(
            Figure(
                "B pull, Spegel stopped (refused), 2.3.7, --no-gate",
                ms(seconds) if finished else f"> {seconds:.0f} s",
                "connection refused: containerd tries upstream at once",
            )
        )
        say(f"2.3.7 Spegel stopped, no gate: {seconds:.2f} s")

        # Spegel on B hung
        nogate_ref = cluster.push_image("bench/hung-nogate", layers=args.layers, size=size)
        gate_ref = cluster.push_image("bench/hung-gate", layers=args.layers, size=size)
        with HungListener(b) as hung:
            with_mirror_nogate(b)
            seconds, finished = capped_pull(b, nogate_ref, args.hung_cap)
            figures.append(hung_figure("2.3.7", "--no-gate (mirror kept)", seconds, finished))
            say(f"2.3.7 hung, no gate: {seconds:.1f} s, finished={finished}")
            began = time.monotonic()
            for _ in range(GATE_FAILURES):
                b.apply()
            withdraw_s = time.monotonic() - began
            if b.mirror in b.hosts_toml():
                raise RuntimeError("the gate did not withdraw B's hung mirror")
            before = hung.accepted
            gated = timed_pull(b, gate_ref)
            figures.append(
                Figure(
                    "B pull, Spegel hung, 2.3.7, gate (mirror withdrawn)",
                    ms(gated),
                    f"withdrawn after {GATE_FAILURES} applies ({withdraw_s:.1f} s of 1 s probes); "
                    f"hung listener asked {hung.accepted - before} times",
                )
            )
            say(f"2.3.7 hung, gate: {gated:.2f} s")


def with_mirror_nogate(node: Node) -> None:
    result = node.apply("--no-gate")
    if result.returncode != 0 or node.mirror not in node.hosts_toml():
        raise RuntimeError(f"apply --no-gate on {node.name}: {result.stderr.strip()}")


def capped_pull(node_socket: Node | Path, ref: str, cap: float) -> tuple[float, bool]:
    """crictl pull, killed after `cap` s; (seconds, finished successfully)."""
    socket = node_socket.socket if isinstance(node_socket, Node) else node_socket
    endpoint = f"unix://{socket}"
    argv = [str(CRICTL), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint, "pull", ref]
    began = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return time.monotonic() - began, False
    proc.communicate()
    return time.monotonic() - began, proc.returncode == 0


def hung_figure(version: str, how: str, seconds: float, finished: bool, who: str = "B") -> Figure:
    value = ms(seconds) if finished else f"> {seconds:.0f} s"
    note = "finished" if finished else "not finished, killed (stuck on the hung mirror)"
    what = "Spegel" if who == "B" else "mirror"
    return Figure(f"{who} pull, {what} hung, {version}, {how}", value, note)


@contextmanager
def node_1_6(tmp: Path) -> Iterator[tuple[Sandbox, Path]]:
    root = tmp / "node-1.6"
    with sandbox_on_fake_node(root) as sandbox:
        yield sandbox, root


def bench_1_6(args: argparse.Namespace, figures: list[Figure]) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="spegel-node-bench-p2p-") as d,
        node_1_6(Path(d)) as (
            sandbox,
            root,
        ),
        HangingServer() as hung,
    ):
        say(f"containerd {sandbox.containerd.version} sandbox up")
        fake_nodes.write(
            root,
            "/etc/spegel-node/config.toml",
            f'node_ip = "127.0.0.1"\nhost_port = {hung.port}\n'
            f'registries = ["{sandbox.upstream.url}"]\ngate_failures = {GATE_FAILURES}\n',
        )

        def apply(*extra: str) -> None:
            argv = [sys.executable, "-m", "spegel_node", "apply", "--root", str(root), *extra]
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"apply {extra}: {done.stderr.strip()}")

        apply("--no-gate")
        seconds, finished = capped_pull(sandbox.containerd.socket, sandbox.image_ref, args.hung_cap)
        figures.append(
            hung_figure("1.6.20", "--no-gate (mirror kept)", seconds, finished, "sandbox")
        )
        say(f"1.6.20 hung, no gate: {seconds:.1f} s, finished={finished}")
        for _ in range(GATE_FAILURES):
            apply()
        other = sandbox.push_image("bench/gated")
        before = hung.connections
        seconds, finished = capped_pull(sandbox.containerd.socket, other, args.hung_cap)
        if not finished:
            raise RuntimeError("1.6.20: the gated pull did not finish")
        figures.append(
            Figure(
                "sandbox pull, mirror hung, 1.6.20, gate (withdrawn)",
                ms(seconds),
                f"hung listener asked {hung.connections - before} times; a 1-layer image",
            )
        )


def ms(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds * 1000:.0f} ms"


def runs(values: Sequence[float]) -> str:
    return f"{len(values)} runs, {min(values) * 1000:.0f}-{max(values) * 1000:.0f} ms"


def table(figures: Sequence[Figure]) -> str:
    width = max(len(f.what) for f in figures)
    vwidth = max(len(f.value) for f in figures)
    lines = [f"{'figure':<{width}}  {'value':>{vwidth}}  note"]
    lines += [f"{f.what:<{width}}  {f.value:>{vwidth}}  {f.note}" for f in figures]
    return "\n".join(lines)


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    reason = unavailable()
    if reason:
        out(f"p2p: skipped, {reason}")
        return 0
    figures: list[Figure] = []
    began = time.monotonic()
    bench_cluster(args, figures)
    bench_1_6(args, figures)
    out(table(figures))
    out(f"(p2p benchmark took {time.monotonic() - began:.0f} s)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}runs", dest="p2p_runs", type=int, default=5, help="pulls per median")
    p.add_argument(f"--{prefix}layers", dest="layers", type=int, default=3)
    p.add_argument(f"--{prefix}layer-mib", dest="layer_mib", type=int, default=8)
    p.add_argument(
        f"--{prefix}hung-cap",
        dest="hung_cap",
        type=float,
        default=150.0,
        help="seconds a pull stuck on the hung mirror is given before it is killed",
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.runs = args.p2p_runs
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

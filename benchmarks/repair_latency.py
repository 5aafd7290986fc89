"""Drift-repair latency of `spegel-node run`: p50/p99 over N k3s-style rewrites.

    PYTHONPATH=src .venv/bin/python benchmarks/repair_latency.py [--n 100]

Starts `run` (--no-gate) on a fake node tree, then N times deletes ghcr.io/hosts.toml and writes
it back without the Spegel host (half of them delete-and-recreate, half rename-over), and times
until the Spegel host is back (polled every 0.2 ms). Prints figures; never fails on them.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
HOSTS = "etc/containerd/certs.d"
PERSON = 'server = "https://ghcr.io"\n\n[host."https://cache.example.com"]\n'


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    n = parser.parse_args().n
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "node"
        (root / "etc/containerd").mkdir(parents=True)
        (root / "etc/containerd/config.toml").write_text(
            f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
            f'  config_path = "/{HOSTS}"\n'
        )
        (root / "etc/spegel-node").mkdir(parents=True)
        (root / "etc/spegel-node/config.toml").write_text(
            'registries = ["https://docker.io", "https://ghcr.io"]\nnode_ip = "10.0.0.5"\n'
        )
        ready = Path(tmp) / "ready"
        env = dict(os.environ, PYTHONPATH=str(SRC))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spegel_node",
                "run",
                "--no-gate",
                "--root",
                str(root),
                "--ready-file",
                str(ready),
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not ready.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                print("run did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.001)
        ghcr = root / HOSTS / "ghcr.io/hosts.toml"
        samples: dict[str, list[float]] = {"delete-and-recreate": [], "rename-over": []}
        for i in range(n):
            kind = "delete-and-recreate" if i % 2 == 0 else "rename-over"
            start = time.monotonic()
            if kind == "delete-and-recreate":
                ghcr.unlink()
                ghcr.write_text(PERSON)
            else:
                tmp_file = ghcr.with_name(".k3s.tmp")
                tmp_file.write_text(PERSON)
                tmp_file.replace(ghcr)
            limit = start + 5
            while "10.0.0.5" not in ghcr.read_text():
                if time.monotonic() > limit:
                    print(f"rewrite {i} not repaired within 5 s", file=sys.stderr)
                    proc.send_signal(signal.SIGTERM)
                    return 1
                time.sleep(0.0002)
            samples[kind].append(time.monotonic() - start)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    every = [s for v in samples.values() for s in v]
    for label, values in (*samples.items(), ("all", every)):
        q = statistics.quantiles(values, n=100, method="inclusive")
        print(
            f"run repair latency, {label:20s} n={len(values):3d}  "
            f"p50 {statistics.median(values) * 1000:6.1f} ms  p99 {q[98] * 1000:6.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

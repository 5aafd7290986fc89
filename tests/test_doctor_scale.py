"""doctor with 5,000 registries: no failure that scale causes (issue 11 measured 10.8 s and
false failures). The time itself is a benchmark row (`make bench`: doctor_many_5000), not a
timed assertion; here, every hosts.<registry> check passes and the checks that fail are the
ones a 5-registry node fails too (this fake node runs no daemons)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import fake_nodes
from support.cli import run_cli

from spegel_node.doctor import Facts, diagnose
from spegel_node.doctor.build import build_checks
from spegel_node.doctor.model import Status
from spegel_node.doctor.runner import LOCAL_THREADS, _batches
from spegel_node.node import Node
from spegel_node.settings import load_settings

HOSTS_DIR = "/etc/containerd/certs.d"
SINGLE = ("hosts.shadowing", "hosts.stale")


def make_node(root: Path, n: int, default_mode: bool = False) -> Node:
    """n registries in the config; with `default_mode`, `registries = []` and n registry dirs
    holding a distro's hosts.toml (each one its own hosts.<registry> check)."""
    fake_nodes.make_containerd(root, config_path=HOSTS_DIR)
    hosts = [f"registry-{i:04d}.example.com" for i in range(n)]
    regs = "" if default_mode else ", ".join(f'"https://{h}"' for h in hosts)
    fake_nodes.write(
        root, "/etc/spegel-node/config.toml", f'node_ip = "127.0.0.1"\nregistries = [{regs}]\n'
    )
    for host in hosts if default_mode else ():
        fake_nodes.write(
            root,
            f"{HOSTS_DIR}/{host}/hosts.toml",
            f'server = "https://{host}"\n\n[host."https://mirror.{host}"]\n'
            '  capabilities = ["pull", "resolve"]\n',
        )
    return Node(root)


def failures(
    capsys: pytest.CaptureFixture[str], root: Path, n: int, default_mode: bool = False
) -> tuple[set[str], int]:
    node = make_node(root, n, default_mode)
    assert run_cli(capsys, "apply", "--no-gate", "--root", str(root)).code == 0
    facts = Facts(node, load_settings(node))
    run = diagnose(facts)
    hosts = [r for r in run.results if r.id.startswith("hosts.") and r.id not in SINGLE]
    assert len(hosts) == n + default_mode  # hosts._default too
    assert all(r.status is Status.PASS for r in hosts), [r for r in hosts if r.status != "pass"][:3]
    assert not [r for r in run.results if "did not finish" in r.summary]
    drift = next(r for r in run.results if r.id == "agent.drift")
    assert drift.status is Status.PASS and f"{n + default_mode} files" in drift.summary
    return {r.id for r in run.results if r.status is Status.FAIL}, len(run.results)


@pytest.mark.parametrize("default_mode", [False, True], ids=["registries", "_default"])
def test_5000_registries_fail_nothing_more_than_5(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, default_mode: bool
) -> None:
    small, _ = failures(capsys, tmp_path / "small", 5, default_mode)
    large, count = failures(capsys, tmp_path / "large", 5000, default_mode)
    assert large == small  # containerd.socket and spegel.v2: no daemon runs here
    assert count > 5000


def test_local_checks_share_a_few_threads(tmp_path: Path) -> None:
    node = make_node(tmp_path, 300)
    checks = build_checks(Facts(node, load_settings(node)))
    batches = _batches(checks)
    assert len(batches) == len([c for c in checks if not c.local]) + LOCAL_THREADS
    assert sorted(i for b in batches for i, _ in b) == list(range(len(checks)))

"""doctor's hosts.stale (Spegel tables the config no longer asks for) and agent.drift after a
third party's edit (issue 11): each reported with what to do, and gone once that is done."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_cli
from support.fake_nodes import make_containerd, write

HOSTS = "/etc/containerd/certs.d"
CONFIG = "/etc/spegel-node/config.toml"


def configure(root: Path, registries: list[str], port: int = 29999) -> None:
    regs = ", ".join(f'"https://{r}"' for r in registries)
    write(root, CONFIG, f'node_ip = "127.0.0.1"\nhost_port = {port}\nregistries = [{regs}]\n')


@pytest.fixture
def node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "node"
    make_containerd(root, config_path=HOSTS)
    write(root, f"{HOSTS}/ghcr.io/hosts.toml", 'server = "https://ghcr.io"\n')
    configure(root, ["docker.io", "ghcr.io"])
    apply(capsys, root)
    return root


def apply(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> str:
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(root), *args)
    assert result.code == 0, result.err
    return result.out


def doctor(capsys: pytest.CaptureFixture[str], root: Path, check_id: str) -> dict[str, Any]:
    result = run_cli(capsys, "doctor", "--root", str(root), "--output", "json")
    assert result.code in (0, 1), result.err
    found: dict[str, Any] = {c["id"]: c for c in json.loads(result.out)["checks"]}[check_id]
    return found


def test_fresh_apply_leaves_nothing_stale(capsys: pytest.CaptureFixture[str], node: Path) -> None:
    c = doctor(capsys, node, "hosts.stale")
    assert c["status"] == "pass", c


def test_registry_dropped_from_config(capsys: pytest.CaptureFixture[str], node: Path) -> None:
    configure(node, ["docker.io"])
    c = doctor(capsys, node, "hosts.stale")
    assert c["status"] == "warn", c
    assert (
        f"{HOSTS}/ghcr.io/hosts.toml" in c["summary"] and "outside the health gate" in c["summary"]
    )
    assert "spegel-node apply" in c["remediation"]
    apply(capsys, node)
    assert doctor(capsys, node, "hosts.stale")["status"] == "pass"
    assert (node / HOSTS.lstrip("/") / "ghcr.io/hosts.toml").read_text() == (
        'server = "https://ghcr.io"\n'
    )


def test_old_port_fails_until_apply(capsys: pytest.CaptureFixture[str], node: Path) -> None:
    configure(node, ["docker.io", "ghcr.io"], port=30000)
    c = doctor(capsys, node, "hosts.stale")
    assert c["status"] == "fail", c
    assert (
        "old Spegel mirror http://127.0.0.1:29999" in c["summary"]
        and "(and 1 more)" in c["summary"]
    )
    assert len(c["details"]) == 2 and "spegel-node apply" in c["remediation"]
    apply(capsys, node)
    assert doctor(capsys, node, "hosts.stale")["status"] == "pass"
    text = (node / HOSTS.lstrip("/") / "docker.io/hosts.toml").read_text()
    assert ":30000" in text and ":29999" not in text


def test_hand_written_table_outside_the_config(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    """Not on record: apply will not touch it, so the fix says to edit it by hand."""
    write(
        node,
        f"{HOSTS}/quay.io/hosts.toml",
        'server = "https://quay.io"\n[host."http://127.0.0.1:29999/v2"]\n  capabilities = ["pull"]\n',
    )
    # neither Spegel's init container's _backup nor a person's own _default counts
    write(node, f"{HOSTS}/_backup/hosts.toml", '[host."http://127.0.0.1:29999"]\n')
    write(node, f"{HOSTS}/_default/hosts.toml", '[host."http://127.0.0.1:29999"]\n')
    c = doctor(capsys, node, "hosts.stale")
    assert c["status"] == "warn" and "quay.io" in c["summary"], c
    assert len(c["details"]) == 1
    assert (
        "by hand" in c["remediation"] and "spegel-node apply" not in c["remediation"].split(":")[0]
    )


def test_third_party_edit_is_drift_with_what_to_do(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    f = node / HOSTS.lstrip("/") / "ghcr.io/hosts.toml"
    f.write_text(f.read_text() + '\n[host."https://mirror.example"]\n  capabilities = ["pull"]\n')
    c = doctor(capsys, node, "agent.drift")
    assert c["status"] == "warn" and "changed since the last apply" in c["summary"], c
    assert "spegel-node remove" in c["remediation"] and "--dry-run" in c["remediation"]
    apply(capsys, node)  # re-bases: the edit is now the baseline
    assert doctor(capsys, node, "agent.drift")["status"] == "pass"
    assert run_cli(capsys, "remove", "--root", str(node)).code == 0
    assert f.read_text() == (
        'server = "https://ghcr.io"\n\n[host."https://mirror.example"]\n  capabilities = ["pull"]\n'
    )


@pytest.mark.parametrize(
    ("value", "status", "code"),
    [("3000000h", "fail", "dial_timeout.invalid"), ("-1s", "warn", "dial_timeout.negative")],
)
def test_doctor_reports_a_dial_timeout_containerd_cannot_use(
    capsys: pytest.CaptureFixture[str], node: Path, value: str, status: str, code: str
) -> None:
    f = node / HOSTS.lstrip("/") / "ghcr.io/hosts.toml"
    f.write_text(f.read_text().replace('dial_timeout = "200ms"', f'dial_timeout = "{value}"'))
    assert value in f.read_text()
    c = doctor(capsys, node, "hosts.ghcr.io")
    assert c["status"] == status and code in c["summary"] + " ".join(c["details"]), c


def test_a_k3s_generated_file_is_k3s_business(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    """k3s writes registries.yaml's mirrors at every start: not stale, k3s.registries_yaml's."""
    write(
        node,
        f"{HOSTS}/quay.io/hosts.toml",
        "# File generated by k3s. DO NOT EDIT.\n"
        'server = "https://quay.io/v2"\n[host."http://127.0.0.1:29999/v2"]\n',
    )
    assert doctor(capsys, node, "hosts.stale")["status"] == "pass"

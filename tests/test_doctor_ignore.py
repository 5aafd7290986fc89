"""`doctor --ignore ID`: ignored checks still run and are shown, marked, but neither fail the
exit code nor count in the summary; a pattern matching no known check id only warns."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import Result, run_cli
from support.fake_containerd import FakeContainerd, cri_config
from support.fake_nodes import make_containerd, write
from support.sandbox import free_port

from spegel_node.doctor.build import KNOWN_IDS

HOSTS = "/etc/containerd/certs.d"
UNITS = ("spegel-node-repair.service", "spegel-node-repair.timer", "spegel-node-repair.path")


@pytest.fixture
def no_spegel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Path]:
    """The first rollout before Spegel exists: applied, units enabled, nothing on the mirror
    port, so `spegel.v2` is the one failing check."""
    root = tmp_path / "node"
    make_containerd(root, config_path=HOSTS)
    write(
        root,
        "/etc/spegel-node/config.toml",
        f'node_ip = "127.0.0.1"\nhost_port = {free_port()}\nregistries = ["https://docker.io"]\n',
    )
    assert run_cli(capsys, "apply", "--no-gate", "--root", str(root)).code == 0
    for unit in UNITS:
        write(root, f"/etc/systemd/system/{unit}", "[Unit]\n")
    for wants, unit in (("timers", UNITS[1]), ("paths", UNITS[2])):
        link = root / f"etc/systemd/system/{wants}.target.wants/{unit}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"/etc/systemd/system/{unit}")
    with FakeContainerd(
        root / "run/containerd/containerd.sock", version="2.0.7", config=cri_config(HOSTS)
    ):
        yield root


def doctor(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> Result:
    return run_cli(capsys, "doctor", "--root", str(root), *args)


def doctor_json(
    capsys: pytest.CaptureFixture[str], root: Path, *args: str
) -> tuple[Result, dict[str, Any]]:
    result = doctor(capsys, root, "--output", "json", *args)
    data: dict[str, Any] = json.loads(result.out)
    data["by_id"] = {c["id"]: c for c in data["checks"]}
    return result, data


def failing(data: dict[str, Any]) -> list[str]:
    return [c["id"] for c in data["checks"] if c["status"] == "fail"]


def test_without_ignore_spegel_v2_fails(
    capsys: pytest.CaptureFixture[str], no_spegel: Path
) -> None:
    result, data = doctor_json(capsys, no_spegel)
    assert result.code == 1 and data["ok"] is False
    assert failing(data) == ["spegel.v2"], data["checks"]
    assert not any(c["ignored"] for c in data["checks"])
    assert data["summary"].startswith("1 check failed (")


def test_ignored_check_runs_is_marked_and_does_not_fail_json(
    capsys: pytest.CaptureFixture[str], no_spegel: Path
) -> None:
    result, data = doctor_json(capsys, no_spegel, "--ignore", "spegel.v2")
    assert result.code == 0, result.err
    assert data["ok"] is True
    v2 = data["by_id"]["spegel.v2"]
    assert v2["status"] == "fail" and v2["ignored"] is True  # still run, status kept
    assert v2["remediation"]
    assert [c["id"] for c in data["checks"] if c["ignored"]] == ["spegel.v2"]
    assert re.fullmatch(r"no issues found, 1 ignored \(\d+ checks in \d\.\d\d s\)", data["summary"])
    assert result.err == ""


def test_ignored_check_in_plain_text(capsys: pytest.CaptureFixture[str], no_spegel: Path) -> None:
    result = doctor(capsys, no_spegel, "--ignore", "spegel.v2")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert any(line.startswith("[✗] spegel.v2 (ignored)  ") for line in lines), result.out
    assert re.fullmatch(r"no issues found, 1 ignored \(\d+ checks in \d\.\d\d s\)", lines[-1])


def test_glob_and_repeated_patterns(capsys: pytest.CaptureFixture[str], no_spegel: Path) -> None:
    result, data = doctor_json(capsys, no_spegel, "--ignore", "spegel.*", "--ignore", "agent.t*")
    assert result.code == 0, result.err
    ignored = [c["id"] for c in data["checks"] if c["ignored"]]
    assert ignored == ["spegel.v2", "spegel.readyz", "spegel.metrics", "agent.timer"]
    assert ", 4 ignored (" in data["summary"]
    # A pattern matching only passing checks changes nothing but the marks (hosts.docker.io,
    # hosts.shadowing, hosts.stale).
    result, data = doctor_json(capsys, no_spegel, "--ignore", "hosts.*")
    assert result.code == 1 and failing(data) == ["spegel.v2"]
    assert data["by_id"]["hosts.docker.io"]["ignored"] is True
    assert data["by_id"]["spegel.v2"]["ignored"] is False
    assert data["summary"].startswith("1 check failed, 3 ignored (")


def test_ignore_only_removes_ignored_failures_from_the_count(
    capsys: pytest.CaptureFixture[str], no_spegel: Path
) -> None:
    (no_spegel / "etc/containerd/certs.d/docker.io/hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n'
    )
    result, data = doctor_json(capsys, no_spegel)
    others = {"hosts.docker.io", "agent.drift"}  # the rewrite, and its drift from the record
    assert result.code == 1 and set(failing(data)) == others | {"spegel.v2"}
    result, data = doctor_json(capsys, no_spegel, "--ignore", "spegel.v2")
    assert result.code == 1 and data["ok"] is False
    assert data["summary"].startswith("2 checks failed, 1 ignored (")
    text = doctor(capsys, no_spegel, "--ignore", "spegel.v2")
    assert text.code == 1
    assert "[✗] hosts.docker.io  " in text.out and "[✗] spegel.v2 (ignored)  " in text.out


def test_unknown_pattern_warns_on_stderr_and_is_no_error(
    capsys: pytest.CaptureFixture[str], no_spegel: Path
) -> None:
    result, data = doctor_json(
        capsys, no_spegel, "--ignore", "spegle.v2", "--ignore", "k3s.*", "--ignore", "spegel.v2"
    )
    assert result.code == 0, result.err
    assert data["by_id"]["spegel.v2"]["ignored"] is True
    # k3s.* names known checks (not run on this node): no warning for it.
    assert result.err.splitlines() == [
        "spegel-node: warning: --ignore 'spegle.v2' matches no known check id "
        "(docs/checks.md lists them)"
    ]
    json.loads(result.out)  # stdout stays pure JSON


def test_known_ids_are_the_documented_ones() -> None:
    """Every fixed id in build.KNOWN_IDS is in docs/checks.md's tables, and back."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "checks.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9]+\.[a-z_0-9]+)`", doc, re.MULTILINE))
    assert documented - {"hosts.<registry>"} == set(KNOWN_IDS)


def test_first_rollout_before_spegel_passes_with_spegel_v2_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the role meets before Spegel exists: apply's gate probes /v2/ in vain until it
    withdraws the mirror; then spegel.v2 is the one failing check, and ignoring it passes."""
    root = tmp_path / "node"
    make_containerd(root, config_path=HOSTS)
    write(
        root,
        "/etc/spegel-node/config.toml",
        f'node_ip = "127.0.0.1"\nhost_port = {free_port()}\nregistries = ["https://docker.io"]\n'
        "gate_failures = 1\n",
    )
    assert run_cli(capsys, "apply", "--root", str(root)).code == 0
    with FakeContainerd(
        root / "run/containerd/containerd.sock", version="2.0.7", config=cri_config(HOSTS)
    ):
        result, data = doctor_json(capsys, root)
        assert result.code == 1 and failing(data) == ["spegel.v2"], data["checks"]
        assert data["by_id"]["agent.gate"]["status"] == "warn"  # withdrawn, on purpose
        result, data = doctor_json(capsys, root, "--ignore", "spegel.v2")
        assert result.code == 0 and data["ok"] is True, result.err


def test_rich_table_marks_ignored_checks(no_spegel: Path) -> None:
    import io

    from spegel_node.doctor import Facts, diagnose
    from spegel_node.doctor.render import print_report
    from spegel_node.doctor.runner import ignore_checks
    from spegel_node.node import Node
    from spegel_node.settings import load_settings

    node = Node(no_spegel)
    facts = Facts(node, load_settings(node))
    run = ignore_checks(diagnose(facts), ["spegel.v2"])
    assert run.ok and run.ignored == 1

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    print_report(run, facts.flavor, facts.mirror_url, "text", out)
    text = out.getvalue()
    assert "spegel.v2 (ignored)" in text  # in the table and above its fix
    assert text.count("spegel.v2 (ignored)") == 2, text
    assert "no issues found, 1 ignored (" in text

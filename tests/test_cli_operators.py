"""Operators' CLI habits: common options before the subcommand, completion, --version -o json,
the JSON schema field (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import run_cli

from spegel_node.output import SCHEMA

REPO = Path(__file__).resolve().parents[1]


def _plain_node(root: Path) -> Path:
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
        '  config_path = "/etc/containerd/certs.d"\n'
    )
    (root / "etc/containerd/certs.d").mkdir()
    return root


def test_common_options_before_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _plain_node(tmp_path / "node")
    before = run_cli(capsys, "--root", str(root), "-o", "json", "detect")
    after = run_cli(capsys, "detect", "--root", str(root), "-o", "json")
    assert before.code == after.code == 0, before.err
    assert json.loads(before.out) == json.loads(after.out)
    assert json.loads(before.out)["schema"] == SCHEMA


def test_subcommand_value_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _plain_node(tmp_path / "node")
    result = run_cli(
        capsys,
        "--root",
        str(tmp_path / "missing"),
        "-o",
        "text",
        "detect",
        "--root",
        str(root),
        "-o",
        "json",
    )
    assert result.code == 0, result.err
    assert json.loads(result.out)["schema"] == SCHEMA
    bad = run_cli(capsys, "--root", str(tmp_path / "missing"), "detect")
    assert bad.code == 2
    assert "missing is not a directory" in bad.err


def test_options_without_a_command_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "--root", "/")
    assert result.code == 2
    assert result.err.count("\n") == 1 and "missing command" in result.err


def test_version_json(capsys: pytest.CaptureFixture[str]) -> None:
    text = run_cli(capsys, "--version")
    assert text.code == 0 and text.out.startswith("spegel-node ")
    for args in (["--version", "-o", "json"], ["-o", "json", "--version"]):
        result = run_cli(capsys, *args)
        data = json.loads(result.out)
        assert result.code == 0
        assert data["schema"] == SCHEMA
        assert data["python"] == ".".join(map(str, sys.version_info[:3]))
        assert data["version"] == text.out.split()[1]
        assert data["platform"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def test_bash_completion_loads_and_completes() -> None:
    script = (
        "set -e; source <(spegel-node completion bash);"
        " COMP_WORDS=(spegel-node ap); COMP_CWORD=1; _spegel_node_completion spegel-node;"
        ' printf "%s\\n" "${COMPREPLY[@]}"; echo ---;'
        " COMP_WORDS=(spegel-node --root / doctor --im); COMP_CWORD=4;"
        ' _spegel_node_completion spegel-node; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(
        ["bash", "-c", script], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.split("---\n")
    assert first.split() == ["apply"]
    assert "--image" in second.split()


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_other_shells(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "completion", shell)
    assert result.code == 0
    assert "_SPEGEL_NODE_COMPLETE=complete_" + shell in result.out
    assert run_cli(capsys, "completion", "tcsh").code == 2

"""--help is documentation operators paste from: every command has examples, and they parse."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import run_cli
from support.fake_nodes import make_k3s

COMMANDS = [
    "detect",
    "apply",
    "remove",
    "validate",
    "doctor",
    "helm-values",
    "install-units",
    "configure-containerd",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    result = run_cli(capsys, command, "--help")
    assert result.code == 0
    assert "Examples:" in result.out
    assert f"spegel-node {command}" in result.out


def test_top_level_examples_parse(capsys: pytest.CaptureFixture[str]) -> None:
    text = run_cli(capsys, "--help").out
    examples = [
        line.strip().split("#")[0]
        for line in text.splitlines()
        if line.strip().startswith("spegel-node ")
    ]
    assert len(examples) >= 4
    for example in examples:
        argv = shlex.split(example)[1:]
        result = run_cli(capsys, *argv, "--help")  # parse the options, run nothing
        assert result.code == 0, f"{example}: {result.err}"


def test_usage_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "apply", "--bogus")
    assert result.code == 2
    assert result.err == "spegel-node: error: No such option: --bogus\n"


@pytest.mark.parametrize("command", ["detect", "helm-values", "validate", "doctor"])
def test_common_options_work_before_the_subcommand(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    make_k3s(tmp_path)
    after = run_cli(capsys, command, "--root", str(tmp_path), "-o", "json")
    before = run_cli(capsys, "--root", str(tmp_path), "-o", "json", command)
    equals = run_cli(capsys, f"--root={tmp_path}", "--output=json", command)
    assert before.code == after.code == equals.code and "No such option" not in before.err

    def essence(out: str) -> object:  # doctor's summaries carry timings
        if command != "doctor":
            return out
        return [(c["id"], c["status"]) for c in json.loads(out)["checks"]]

    assert essence(before.out) == essence(after.out) == essence(equals.out)


def test_the_subcommands_own_option_wins(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_k3s(tmp_path)
    result = run_cli(
        capsys, "--root", "/nonexistent", "detect", "--root", str(tmp_path), "-o", "json"
    )
    assert result.code == 0 and json.loads(result.out)["flavor"] == "k3s"


@pytest.mark.parametrize("closed", [">&-", "2>&-", ">&- 2>&-"])
def test_a_closed_stdout_or_stderr_is_no_traceback(tmp_path: Path, closed: str) -> None:
    make_k3s(tmp_path)
    cmd = f"{shlex.quote(sys.executable)} -m spegel_node apply --no-gate --root {tmp_path}"
    done = subprocess.run(
        ["bash", "-c", f"{cmd} {closed}; echo rc=$?"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.strip().endswith("rc=0"), done.stdout
    hosts = tmp_path / "var/lib/rancher/k3s/agent/etc/containerd/certs.d/docker.io/hosts.toml"
    assert hosts.is_file()  # the work was done

"""--help is documentation operators paste from: every command has examples, and they parse."""

from __future__ import annotations

import shlex

import pytest
from support.cli import run_cli

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

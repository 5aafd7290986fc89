"""`spegel-node validate` as an operator runs it: paths, --root, exit codes, output forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import pki
from support.cli import run_cli

HOSTS = "etc/containerd/certs.d"


def test_absolute_ca_paths_resolve_under_root(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "etc/certs").mkdir(parents=True)
    (tmp_path / "etc/certs/ca.crt").write_text(pki.EC_CERT)
    reg = tmp_path / HOSTS / "ghcr.io"
    reg.mkdir(parents=True)
    (reg / "hosts.toml").write_text(
        'server = "https://ghcr.io"\n[host."https://cache.local"]\n  ca = "/etc/certs/ca.crt"\n'
    )
    result = run_cli(capsys, "validate", f"/{HOSTS}", "--root", str(tmp_path), "-o", "json")
    assert result.code == 0, result.out
    assert json.loads(result.out)["findings"] == []


def test_errors_exit_1_and_strict_turns_warnings_into_failures(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('capabilities = "pull"\n')
    result = run_cli(capsys, "validate", str(bad))
    assert result.code == 1
    assert "capabilities.type" in result.out
    warn = tmp_path / "warn.toml"
    warn.write_text('server = "127.0.0.1:5001"\n[host."http://127.0.0.1:5002"]\n')
    assert run_cli(capsys, "validate", str(warn)).code == 0
    assert run_cli(capsys, "validate", str(warn), "--strict").code == 1


def test_missing_path_and_bad_version_are_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = run_cli(capsys, "validate", str(tmp_path / "nope.toml"))
    assert missing.code == 2
    assert missing.err.count("\n") == 1
    version = run_cli(capsys, "validate", str(tmp_path), "--containerd-version", "banana")
    assert version.code == 2
    assert "Traceback" not in version.err

"""One node holding every kind of credential spegel-node can come across, and every command
that prints (text and JSON; dry run and real; doctor's textfile; `run`'s log lines): no output
holds any of them (issue 11). hosts.toml: `Authorization` and other headers, URL user info
whose password holds '@' and ':'; containerd's config: `auth`, `password`, `identitytoken`,
`token` and `registry.headers`."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cli import run_cli
from support.faults import hosts, make_node

from spegel_node.redact import RedactingStream

SRC = Path(__file__).resolve().parent.parent / "src"
SECRETS = (
    "Bearer hdr-S3CRET-1",
    "hdr-S3CRET-1",
    "xkey-S3CRET-2",
    "p@ss:w0rd-S3CRET-3",
    "w0rd-S3CRET-3",
    "robot-user-S3CRET",
    "pw-S3CRET-4",
    "YXV0aC1TM0NSRVQtNQ==",
    "idtok-S3CRET-6",
    "tok-S3CRET-7",
    "crihdr-S3CRET-8",
    "broken-S3CRET-9",
)
GHCR = """\
server = "https://ghcr.io"

[host."https://robot-user-S3CRET:p@ss:w0rd-S3CRET-3@cache.example.com"]
  capabilities = ["pull", "resolve"]
  [host."https://robot-user-S3CRET:p@ss:w0rd-S3CRET-3@cache.example.com".header]
    Authorization = "Bearer hdr-S3CRET-1"
    X-Api-Key = ["xkey-S3CRET-2"]
"""
# not TOML: apply and remove refuse it and name it; validate reports the syntax error
QUAY_BROKEN = """\
server = "https://quay.io"

[host."https://u:broken-S3CRET-9@q.example".header]
Authorization = "Bearer broken-S3CRET-9"
oops = = 1
"""
CONTAINERD = """\
version = 2

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
  [plugins."io.containerd.grpc.v1.cri".registry.configs."reg.example.com".auth]
    username = "robot"
    password = "pw-S3CRET-4"
    auth = "YXV0aC1TM0NSRVQtNQ=="
    identitytoken = "idtok-S3CRET-6"
  [plugins."io.containerd.grpc.v1.cri".registry.configs."other.example.com".auth]
    token = "tok-S3CRET-7"
  [plugins."io.containerd.grpc.v1.cri".registry.headers]
    X-Secret = ["crihdr-S3CRET-8"]
"""
REGISTRIES = ["https://docker.io", "https://ghcr.io", "https://quay.io"]
COMMANDS = [
    ["detect"],
    ["apply", "--dry-run", "--no-gate"],
    ["apply", "--dry-run"],
    ["apply"],  # the gate's probe fails (port 9): the mirror is still written
    ["apply", "--no-gate"],
    ["remove", "--dry-run"],
    ["validate"],
    ["validate", "--strict", "--containerd-version", "2.1.4"],
    ["validate", "/etc/containerd/certs.d/ghcr.io/hosts.toml"],
    ["validate", "/etc/containerd/certs.d/quay.io/hosts.toml"],
    ["doctor"],
    ["helm-values"],
    ["install-units", "--dry-run"],
    ["configure-containerd", "--dry-run"],
    ["configure-containerd"],
    ["remove"],
]


def plant(root: Path) -> Path:
    make_node(root, REGISTRIES, extra_config="host_port = 9\n")
    config = root / "etc/spegel-node/config.toml"
    config.write_text(config.read_text().replace('"10.0.0.5"', '"127.0.0.1"'))
    (root / "etc/containerd/config.toml").write_text(CONTAINERD)
    for name, text in (("ghcr.io", GHCR), ("quay.io", QUAY_BROKEN)):
        (hosts(root) / name).mkdir(parents=True)
        (hosts(root) / name / "hosts.toml").write_text(text)
    return root


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_the_node_holds_every_secret(tmp_path: Path) -> None:
    root = plant(tmp_path / "node")
    everything = GHCR + QUAY_BROKEN + CONTAINERD
    assert all(s in everything for s in SECRETS)
    assert (root / "etc/containerd/config.toml").read_text() == CONTAINERD


@pytest.mark.parametrize("output", ["text", "json"])
def test_no_command_shows_a_secret(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, output: str
) -> None:
    root = plant(tmp_path / "node")
    textfile = tmp_path / "doctor.prom"
    seen = []
    for args in [*COMMANDS, ["doctor", "--textfile", str(textfile)]]:
        result = run_cli(capsys, *args, "--root", str(root), "--output", output)
        both = result.out + result.err
        assert "Traceback" not in both, (args, both)
        assert not leaks(both), (args, leaks(both), both)
        if output == "json" and result.out.strip():
            json.loads(result.out)
        seen.append((args[0], result.code, len(both)))
    assert not leaks(textfile.read_text())
    # the commands did their work: files were written, diffs shown, the broken file named
    assert all(n > 0 for _, _, n in seen), seen
    assert "pw-S3CRET-4" in (root / "etc/containerd/config.toml").read_text()
    assert (hosts(root) / "ghcr.io/hosts.toml").read_text() == GHCR  # remove gave it back


def test_the_run_log_shows_no_secret(tmp_path: Path) -> None:
    """`run`'s key=value lines on stderr, while it repairs a file holding credentials and is
    refused one it cannot parse."""
    root = plant(tmp_path / "node")
    shutil.rmtree(hosts(root) / "quay.io")
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("JOURNAL_STREAM", None)
    env.pop("NOTIFY_SOCKET", None)
    argv = [sys.executable, "-m", "spegel_node", "run", "--root", str(root)]
    proc = subprocess.Popen(
        [*argv, "--ready-file", str(ready)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        ghcr = hosts(root) / "ghcr.io/hosts.toml"
        _wait(proc, ready.exists)
        ghcr.write_text(GHCR)  # a person puts their file back: run merges the mirror in again
        _wait(proc, lambda: "127.0.0.1:9" in ghcr.read_text())
        (hosts(root) / "quay.io").mkdir(exist_ok=True)
        (hosts(root) / "quay.io/hosts.toml").write_text(QUAY_BROKEN)
        _wait(proc, lambda: any("quay.io" in line for line in lines))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        reader.join(timeout=5)
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert "event=ready" in err and "event=problem" in err
    assert not leaks(err), (leaks(err), err)


def _wait(proc: subprocess.Popen[str], cond: Callable[[], bool], limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        try:
            code = proc.wait(timeout=0.01)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"spegel-node run exited early with {code}")


def test_every_line_passes_the_one_redaction_place(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Even text no command meant to redact (a bad config value echoed in the error) goes out
    through redact.RedactingStream, which cli.main puts around stdout and stderr."""
    config = tmp_path / "config.toml"
    config.write_text('node_ip = "https://robot:p@ss:w0rd-S3CRET-3@h.example"\n')
    result = run_cli(capsys, "apply", "--dry-run", "--config", str(config), "--root", str(tmp_path))
    assert result.code == 2 and "'node_ip' must be" in result.err and "h.example" in result.err
    assert not leaks(result.out + result.err), result.err


def test_redacting_stream_holds_a_line_until_it_ends() -> None:
    out = io.StringIO()
    stream = RedactingStream(out)
    for piece in ("see https://robot:p@", "ss:w0rd-S3CRET-3", "@h.example/v2\nnext"):
        stream.write(piece)
    assert out.getvalue() == "see https://<redacted>@h.example/v2\n"
    stream.write(" http://a:b@c\n")
    stream.flush()
    assert out.getvalue().endswith("next http://<redacted>@c\n")
    assert stream.isatty() is False

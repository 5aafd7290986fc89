"""Secrets: header values (and URL user info) from hosts.toml never appear in any output of any
command (text, JSON, diffs, problems, doctor's textfile); the state record holding the
originals is 0600 in a 0700 dir."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from support.cli import run_cli
from support.faults import SECRET_FILE, hosts, make_node, state_dir

# Every form a header value can take, valid TOML or not.
GCR_FILE = """\
server = "https://gcr.io"

[host."https://g.example"]
  header = { Authorization = "Bearer gcr-inl1ne-s3cret" }

[host."https://h.example"]
  header.X-Token = "gcr-d0tted-\\u0073ecret"
  header.X-List = ["gcr-l1st-s3cret-a", "gcr-l1st-s3cret-b"]

[host."https://i.example".header] # the CI token
  Authorization = \"\"\"Bearer \\
      gcr-c0ntinued-s3cret\"\"\"
"""
QUAY_BROKEN = """\
server = "https://quay.io"

[host."https://q.example".header]
Authorization = \"\"\"Bearer \\
   qu4y-multi-line-s3cret=\"\"\"
X-Api-Key = [
  "qu4y-list-s3cret=",
]
header.X = "qu4y-d0tted-s3cret"
broken = = true
"""
LOCAL_FILE = """\
server = "http://127.0.0.1:5000"

[host."https://mirror-user:p4ssw0rd-in-url@m.example"]
  capabilities = ["pull"]
"""
SECRETS = (
    "s3cr3t-t0ken",
    "k3y-0ne",
    "k3y-tw0",
    "gcr-inl1ne-s3cret",
    "gcr-d0tted-",
    "gcr-l1st-s3cret",
    "gcr-c0ntinued-s3cret",
    "qu4y-multi-line-s3cret",
    "qu4y-list-s3cret",
    "qu4y-d0tted-s3cret",
    "p4ssw0rd-in-url",
)
REGISTRIES = [
    "https://docker.io",
    "https://ghcr.io",
    "https://quay.io",
    "https://gcr.io",
    "http://127.0.0.1:5000",
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the mirror on a closed loopback port: gate and doctor probes fail fast
    root = make_node(
        tmp_path_factory.mktemp("secrets") / "node", REGISTRIES, extra_config="host_port = 9\n"
    )
    (root / "etc/spegel-node/config.toml").write_text(
        (root / "etc/spegel-node/config.toml")
        .read_text()
        .replace('node_ip = "10.0.0.5"', 'node_ip = "127.0.0.1"')
    )
    for name, text in (
        ("ghcr.io", SECRET_FILE),
        ("gcr.io", GCR_FILE),
        ("quay.io", QUAY_BROKEN),
        ("127.0.0.1:5000", LOCAL_FILE),
    ):
        (hosts(root) / name).mkdir(parents=True)
        (hosts(root) / name / "hosts.toml").write_text(text)
    return root


def _assert_clean(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, (leaked, text)


def _run(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str]:
    result = run_cli(capsys, *args, "--root", str(root))
    assert "Traceback" not in result.err
    both = result.out + result.err
    _assert_clean(both)
    if "json" in args and result.out.strip():
        json.loads(result.out)
    return result.code, both


COMMANDS = [
    ["detect"],
    ["apply", "--dry-run", "--no-gate"],
    ["apply", "--dry-run"],
    ["remove", "--dry-run"],
    ["validate"],
    ["validate", "--strict", "--containerd-version", "1.6.20"],
    ["validate", "/etc/containerd/certs.d/quay.io/hosts.toml"],
    ["validate", "/etc/containerd/certs.d/gcr.io/hosts.toml"],
    ["helm-values"],
    ["doctor"],
]


def test_the_node_really_holds_the_secrets(node: Path) -> None:
    everything = "".join(p.read_text() for p in hosts(node).glob("*/hosts.toml"))
    assert all(s in everything for s in SECRETS)


@pytest.mark.parametrize("output", ["text", "json"])
@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a) for a in COMMANDS])
def test_read_only_commands_never_show_a_secret(
    capsys: pytest.CaptureFixture[str], node: Path, args: list[str], output: str
) -> None:
    _run(capsys, node, *args, "--output", output)


@pytest.mark.parametrize("output", ["text", "json"])
def test_apply_and_remove_never_show_a_secret(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, node: Path, output: str
) -> None:
    root = tmp_path / "node"
    shutil.copytree(node, root, symlinks=True)
    code, out = _run(capsys, root, "apply", "--output", output)  # gate probe fails: still written
    assert code == 1  # quay.io's broken file is refused
    assert "quay.io/hosts.toml" in out
    for name in ("ghcr.io", "gcr.io", "127.0.0.1:5000"):
        assert b"127.0.0.1:9" in (hosts(root) / name / "hosts.toml").read_bytes()
    _run(capsys, root, "apply", "--no-gate", "--output", output)
    _run(capsys, root, "apply", "--dry-run", "--no-gate", "--output", output)
    # a file apply created, since edited by hand into broken TOML holding a header: remove
    # keeps it (a person wrote it), names it, and never shows its header
    docker = hosts(root) / "docker.io/hosts.toml"
    edited = docker.read_text() + QUAY_BROKEN.split("\n", 2)[2]
    docker.write_text(edited)
    code, out = _run(capsys, root, "remove", "--dry-run", "--output", output)
    assert "docker.io/hosts.toml" in out
    code, out = _run(capsys, root, "remove", "--output", output)
    assert code == 1  # docker.io cannot be stripped; quay.io was never taken over
    assert "docker.io/hosts.toml" in out
    assert docker.read_text() == edited
    assert (hosts(root) / "ghcr.io/hosts.toml").read_text() == SECRET_FILE


def test_doctor_textfile_never_holds_a_secret(
    capsys: pytest.CaptureFixture[str], node: Path, tmp_path: Path
) -> None:
    textfile = tmp_path / "spegel_node.prom"
    _run(capsys, node, "doctor", "--textfile", str(textfile))
    _assert_clean(textfile.read_text())


def test_state_record_is_root_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = make_node(tmp_path / "node", REGISTRIES)
    (hosts(root) / "ghcr.io").mkdir(parents=True)
    (hosts(root) / "ghcr.io/hosts.toml").write_text(SECRET_FILE)
    assert run_cli(capsys, "apply", "--no-gate", "--root", str(root)).code == 0
    record = state_dir(root) / "state.json"
    assert stat.S_IMODE(state_dir(root).stat().st_mode) == 0o700
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE((state_dir(root) / "lock").stat().st_mode) == 0o600
    assert "ghcr.io/hosts.toml" in json.loads(record.read_text())["files"]  # it holds the original

"""The containerd socket client (doctor/cri.py): gRPC over h2 against the fake containerd in its
every mode, the protobuf reader, and the real containerd (1.6.20 here) with its CRI config read
live, with non-default values, and with the CRI plugin disabled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fake_containerd import NO_CRI_MESSAGE, FakeContainerd, cri_config
from support.sandbox import ContainerdProc, Sandbox, missing_binaries

from spegel_node.containerd_config import read_containerd_config
from spegel_node.doctor import cri
from spegel_node.doctor.checks.containerd import ContainerdSocket
from spegel_node.doctor.facts import Facts
from spegel_node.doctor.model import Status
from spegel_node.node import Node
from spegel_node.settings import settings_from_mapping

# --- against the fake containerd -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "state", "detail", "status_error"),
    [
        ("hang", "no_answer", "accepts connections but did not answer within 0.5s", ""),
        ("handshake", "no_answer", "answered the handshake but not the calls within 0.5s", ""),
        ("close", "error", "accepts connections but closes them without answering", ""),
        ("garbage", "error", "answers, but not with HTTP/2: is this containerd's socket?", ""),
        (
            "no_cri",
            "ok",
            "answers",
            f"the CRI Status call answered UNIMPLEMENTED ({NO_CRI_MESSAGE}): "
            "the CRI plugin is not loaded",
        ),
        ("cri_error", "ok", "answers", "the CRI Status call answered INTERNAL (boom: 100% broken)"),
        ("reset", "ok", "answers", "the CRI Status call was reset (INTERNAL_ERROR)"),
    ],
)
def test_every_way_a_socket_can_answer(
    tmp_path: Path, mode: str, state: str, detail: str, status_error: str
) -> None:
    sock = tmp_path / "c.sock"
    with FakeContainerd(sock, version="2.0.7", mode=mode):
        started = time.monotonic()
        answer = cri.query(sock, 0.5)
        took = time.monotonic() - started
    assert took < 0.9
    assert (answer.state, answer.detail, answer.status_error) == (state, detail, status_error)
    if state == "ok":  # Version answered; the Status failure is reported, not guessed
        assert (answer.version, answer.revision, answer.info) == ("2.0.7", "fake-revision", {})


def test_a_big_cri_status_goes_through_flow_control(tmp_path: Path) -> None:
    """A Status answer several times h2's default 64 KiB window: the client must hand window back."""
    config = cri_config("/etc/containerd/certs.d")
    config["runtimes"] = {f"runtime-{i}": {"options": "x" * 1000} for i in range(400)}
    sock = tmp_path / "c.sock"
    with FakeContainerd(sock, config=config):
        answer = cri.query(sock, 1.0)
    assert answer.state == "ok" and not answer.status_error
    assert len(answer.info["config"]) > 400_000
    assert json.loads(answer.info["config"]) == config


def test_cri_plugin_off_is_a_warning_naming_grpc_status(tmp_path: Path) -> None:
    root = tmp_path / "node"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text("version = 2\n")
    node = Node(root)
    with FakeContainerd(root / "run/containerd/containerd.sock", version="2.0.7", mode="no_cri"):
        facts = Facts(node, settings_from_mapping({"node_ip": "127.0.0.1"}), live=False)
        result = ContainerdSocket().run(facts)
    assert result.status is Status.WARN
    assert (
        "answered UNIMPLEMENTED" in result.summary and "CRI plugin is not loaded" in result.summary
    )
    assert facts.live_config is None


def test_spegel_node_version_does_not_import_h2() -> None:
    code = (
        "import sys; from spegel_node import cli\n"
        "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
        "assert not any(m == 'h2' or m.startswith('h2.') for m in sys.modules), 'h2 imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "0." in done.stdout


# --- the protobuf reader -------------------------------------------------------------------------


def test_protobuf_fields_of_every_wire_type() -> None:
    message = (
        b"\x08\x96\x01"  # 1: varint 150
        + b"\x11" + b"\x00" * 8  # 2: fixed64, skipped
        + b"\x1a\x03abc"  # 3: bytes
        + b"\x25" + b"\x00" * 4  # 4: fixed32, skipped
        + b"\x2a\x00"  # 5: empty bytes
    )  # fmt: skip
    assert list(cri._fields(message)) == [(1, 150), (3, b"abc"), (5, b"")]
    assert list(cri._strings(message)) == [(3, "abc"), (5, "")]


@pytest.mark.parametrize(
    "broken",
    [
        b"\x08",  # a varint cut off
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a varint longer than 64 bits
        b"\x1a\x05ab",  # bytes longer than what is left
        b"\x0b\x00",  # a group (wire type 3): not read
    ],
)
def test_protobuf_reader_stops_at_broken_input(broken: bytes) -> None:
    assert list(cri._fields(b"\x1a\x01x" + broken)) == [(3, b"x")]


def test_grpc_message_framing() -> None:
    assert cri._message(cri.grpc_frame(b"hi")) == b"hi"
    assert cri._message(b"\x01\x00\x00\x00\x02hi") is None  # compressed: never asked for
    assert cri._message(b"\x00\x00\x00\x00\x05hi") is None  # cut short
    assert cri._message(b"") is None


# --- against the real containerd -----------------------------------------------------------------


class _Containerd(ContainerdProc):
    """A second real containerd, its config edited (CRI settings, disabled plugins)."""

    def __init__(self, directory: Path, hosts_dir: Path, edits: dict[str, str]) -> None:
        super().__init__(directory, hosts_dir)
        self.edits = edits

    def _config(self) -> str:
        text = super()._config()
        for old, new in self.edits.items():
            assert old in text, old
            text = text.replace(old, new, 1)
        return text


@pytest.fixture
def real_containerd_dir() -> Iterator[Path]:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (make installs them)")
    if os.geteuid() != 0:
        pytest.skip("needs root (containerd)")
    with tempfile.TemporaryDirectory(prefix="spegel-cri-", dir="/tmp") as short:  # sun_path
        yield Path(short)


@pytest.mark.sandbox
def test_live_cri_config_matches_the_sandbox_config(sandbox: Sandbox) -> None:
    answer = cri.query(sandbox.containerd.socket, 1.0)
    assert answer.state == "ok" and not answer.status_error, answer
    assert answer.version == sandbox.containerd.version  # e.g. 1.6.20~ds1
    live = json.loads(answer.info["config"])
    config = read_containerd_config(Node(Path("/")), str(sandbox.containerd.config_path))
    assert config.config_path == str(sandbox.hosts_dir)
    assert config.discard_unpacked_layers is False
    assert live["registry"]["configPath"] == config.config_path
    assert live["containerd"]["discardUnpackedLayers"] is config.discard_unpacked_layers


@pytest.mark.sandbox
def test_non_default_cri_values_are_read_live(real_containerd_dir: Path) -> None:
    """discard_unpacked_layers = true and a two-root config_path: not containerd's defaults, so
    the values can only have come from the running daemon."""
    roots = f"{real_containerd_dir}/certs.d:/etc/docker/certs.d"
    hosts = real_containerd_dir / "certs.d"
    edits = {
        "discard_unpacked_layers = false": "discard_unpacked_layers = true",
        f'config_path = "{hosts}"': f'config_path = "{roots}"',
    }
    daemon = _Containerd(real_containerd_dir / "ctd", hosts, edits)
    daemon.start()
    try:
        answer = cri.query(daemon.socket, 1.0)
    finally:
        daemon.stop()
    assert answer.state == "ok" and not answer.status_error, answer
    config = read_containerd_config(Node(Path("/")), str(daemon.config_path))
    assert (config.config_path, config.discard_unpacked_layers) == (roots, True)
    live = json.loads(answer.info["config"])
    assert live["registry"]["configPath"] == roots
    assert live["containerd"]["discardUnpackedLayers"] is True


@pytest.mark.sandbox
def test_real_containerd_with_the_cri_plugin_disabled(real_containerd_dir: Path) -> None:
    edits = {"version = 2\n": 'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n'}
    daemon = _Containerd(real_containerd_dir / "ctd", real_containerd_dir / "certs.d", edits)
    daemon.start()
    try:
        answer = cri.query(daemon.socket, 1.0)
        version = daemon.version
    finally:
        daemon.stop()
    assert answer.state == "ok" and answer.version == version, answer
    assert answer.info == {}
    assert answer.status_error == (
        f"the CRI Status call answered UNIMPLEMENTED ({NO_CRI_MESSAGE}): "
        "the CRI plugin is not loaded"
    )

"""Every containerd in the matrix against its own `containerd config default`.

Debian's 1.6.20 and the pinned peers (1.7.35, 2.0.14, 2.1.9, 2.2.9, 2.3.7, `make peers`):

- the default file of each version (config version 2, 3, or 4 from 2.3) is read for the socket
  and the CRI settings, and `config dump` (that version's own loader) agrees on the socket;
- `configure-containerd` on a fake root holding that default, then the same binary's
  `config dump` shows `config_path` and `discard_unpacked_layers = false`;
- in the sandbox that containerd starts on the configured file (its root, state and sockets
  moved to a temp dir), `crictl pull` is served by the mirror, and doctor's containerd checks
  pass against it;
- `apply` warns when a 2.1+ containerd pulls through the transfer service with several
  config_path roots (doctor's `containerd.local_image_pull`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from support import fake_nodes
from support.cli import run_cli
from support.fake_containerd import FakeContainerd, cri_config
from support.peers import CONTAINERD_VERSIONS, peer_bin
from support.sandbox import Sandbox

from spegel_node.containerd_config import read_containerd_config
from spegel_node.layout import detect
from spegel_node.node import Node

DEBIAN = "1.6.20"
VERSIONS = (DEBIAN, *CONTAINERD_VERSIONS.values())
# What `containerd config default` writes, per version (measured).
CONFIG_VERSION = {"1.6.20": 2, "1.7.35": 2, "2.0.14": 3, "2.1.9": 3, "2.2.9": 3, "2.3.7": 4}
MAIN = "/etc/containerd/config.toml"
HOSTS = "/etc/containerd/certs.d"
SOCK = "/run/containerd/containerd.sock"
V2_CRI = "io.containerd.grpc.v1.cri"
IMAGES = "io.containerd.cri.v1.images"
GRPC = "io.containerd.server.v1.grpc"


def containerd_bin(version: str) -> Path:
    if version == DEBIAN:
        found = shutil.which("containerd")
        if found is None:
            pytest.fail("Debian's containerd 1.6.20 is not installed (make installs it)")
        return Path(found)
    return peer_bin("containerd", version=version)


def default_config(version: str) -> str:
    out = subprocess.run(
        [str(containerd_bin(version)), "config", "default"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return out.stdout


def config_dump(version: str, config: Path) -> dict[str, Any]:
    out = subprocess.run(
        [str(containerd_bin(version)), "--config", str(config), "config", "dump"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return tomllib.loads(out.stdout)


def dumped_socket(dump: dict[str, Any]) -> str:
    """The gRPC address containerd listens on, from its own dump (2.3+: the server plugin)."""
    server = dump.get("plugins", {}).get(GRPC)
    return str(server["address"] if server else dump["grpc"]["address"])


def dumped_cri(dump: dict[str, Any]) -> tuple[str, bool]:
    """(config_path, discard_unpacked_layers) as that containerd loads them."""
    plugins = dump["plugins"]
    if IMAGES in plugins:
        images = plugins[IMAGES]
        return images["registry"]["config_path"], images["discard_unpacked_layers"]
    cri = plugins[V2_CRI]
    return cri["registry"]["config_path"], cri["containerd"]["discard_unpacked_layers"]


def default_node(root: Path, version: str, text: str | None = None) -> Path:
    """A plain-containerd fake node whose config is `text` (default: that version's own)."""
    fake_nodes.make_containerd(root, write_config=False)
    return fake_nodes.write(root, MAIN, default_config(version) if text is None else text)


def with_socket(text: str, config_version: int, sock: str) -> str:
    """`text` (a default config) with the gRPC address set where that config version has it."""
    if config_version >= 4:
        old = f"[plugins.'{GRPC}']\n    address = '{SOCK}'"
        new = f"[plugins.'{GRPC}']\n    address = '{sock}'"
    else:
        quote = "'" if config_version == 3 else '"'
        old = f"[grpc]\n  address = {quote}{SOCK}{quote}"
        new = f"[grpc]\n  address = {quote}{sock}{quote}"
    assert old in text
    return text.replace(old, new)


# --- the socket and settings of each version's default file -------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_default_config_of_each_version_is_read(tmp_path: Path, version: str) -> None:
    text = default_config(version)
    assert tomllib.loads(text)["version"] == CONFIG_VERSION[version]
    default_node(tmp_path, version, text)
    config = read_containerd_config(Node(tmp_path), MAIN)
    assert config.version == CONFIG_VERSION[version]
    assert config.address == SOCK == dumped_socket(config_dump(version, tmp_path / MAIN[1:]))
    assert config.config_path is None and config.discard_unpacked_layers is False
    # a socket moved in that version's own place is where detect and doctor look
    custom = "/run/custom/containerd.sock"
    fake_nodes.write(tmp_path, MAIN, with_socket(text, config.version, custom))
    fake_nodes.socket(tmp_path, custom)
    assert dumped_socket(config_dump(version, tmp_path / MAIN[1:])) == custom
    assert read_containerd_config(Node(tmp_path), MAIN).address == custom
    assert detect(Node(tmp_path)).containerd_socket == custom


def test_version_4_does_not_read_a_grpc_table(tmp_path: Path) -> None:
    """2.3.7 migrates [grpc] only out of a version 3 file: in a version 4 file it is ignored."""
    for config_version, expected in ((3, "/run/custom.sock"), (4, SOCK)):
        path = fake_nodes.write(
            tmp_path, MAIN, f'version = {config_version}\n[grpc]\n  address = "/run/custom.sock"\n'
        )
        assert dumped_socket(config_dump("2.3.7", path)) == expected
        assert read_containerd_config(Node(tmp_path), MAIN).address == (
            expected if config_version == 3 else None
        )


# --- configure-containerd on each version's default, proven by that version's config dump -------


def configure_default(
    capsys: pytest.CaptureFixture[str], root: Path, version: str, *args: str
) -> dict[str, Any]:
    default_node(root, version)
    result = run_cli(capsys, "configure-containerd", "--root", str(root), "-o", "json", *args)
    assert result.code == 0, result.err
    data: dict[str, Any] = json.loads(result.out)
    assert data["changed"] is True and data["version"] == CONFIG_VERSION[version], data
    return data


@pytest.mark.parametrize("version", VERSIONS)
def test_configure_containerd_on_each_default_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], version: str
) -> None:
    configure_default(capsys, tmp_path, version)
    path = tmp_path / MAIN[1:]
    assert dumped_cri(config_dump(version, path)) == (HOSTS, False)
    dumped = config_dump(version, path)
    assert dumped_socket(dumped) == SOCK  # nothing else moved
    again = run_cli(capsys, "configure-containerd", "--root", str(tmp_path), "-o", "json")
    assert json.loads(again.out)["changed"] is False


# --- the daemon on the configured default: CRI pulls through the mirror, doctor clean -----------


def sandboxed(text: str, sb: Sandbox) -> str:
    """A configured default config with containerd's own paths moved into the sandbox."""
    d = sb.containerd.dir
    for old, new in (
        (SOCK, str(sb.containerd.socket)),  # also the .ttrpc socket next to it
        ("/var/lib/containerd", str(d / "root")),
        ("/run/containerd", str(d / "state")),
        ("/var/run/nri", str(d / "nri")),
        ("/opt/containerd", str(d / "opt")),
        ("/etc/containerd/conf.d", str(d / "conf.d")),
    ):
        text = text.replace(f"'{old}", f"'{new}").replace(f'"{old}', f'"{new}')
    assert str(sb.hosts_dir) in text
    return text


def doctor_checks(sb: Sandbox) -> dict[str, dict[str, str]]:
    result = subprocess.run(
        [sys.executable, "-m", "spegel_node", "doctor", "-o", "json",
         "--containerd-socket", str(sb.containerd.socket),
         "--containerd-config", str(sb.containerd.config_path),
         "--hosts-dir", str(sb.hosts_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return {c["id"]: c for c in json.loads(result.stdout)["checks"]}


@pytest.mark.sandbox
@pytest.mark.parametrize("version", VERSIONS)
def test_containerd_runs_on_its_configured_default_and_pulls_through_the_mirror(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], version: str
) -> None:
    with Sandbox(containerd_version=None if version == DEBIAN else version) as sb:
        configure_default(capsys, tmp_path, version, "--hosts-dir", str(sb.hosts_dir))
        text = sandboxed((tmp_path / MAIN[1:]).read_text(), sb)
        sb.containerd.stop()
        sb.containerd.config_text = text
        sb.containerd.start()
        assert sb.containerd.version.startswith(version), sb.containerd.version
        dump = config_dump(version, sb.containerd.config_path)
        assert dumped_cri(dump) == (str(sb.hosts_dir), False)
        assert dumped_socket(dump) == str(sb.containerd.socket)
        sb.write_mirror_first()
        up, mirror = sb.upstream.mark(), sb.spegel.mark()
        result = sb.crictl_pull()
        assert result.returncode == 0, result.stderr[-2000:]
        served = sb.spegel.containerd_requests(since=mirror)
        assert any("/blobs/" in r.path for r in served), served
        assert sb.upstream.containerd_requests(since=up) == []
        checks = doctor_checks(sb)
    statuses = {k: v["status"] for k, v in checks.items() if k.startswith("containerd.")}
    local = "pass" if version >= "2.1" else "skip"
    assert statuses == {
        "containerd.socket": "pass",
        "containerd.config": "pass",
        "containerd.config_path": "pass",
        "containerd.discard_unpacked_layers": "pass",
        "containerd.local_image_pull": local,
    }, json.dumps(checks, indent=1)
    assert f"config version {CONFIG_VERSION[version]}" in checks["containerd.config"]["summary"]


# --- apply warns about the multi-root case ------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "roots", "warned"),
    [
        ("2.2.9", f"{HOSTS}:/etc/docker/certs.d", True),
        ("2.1.9", f"{HOSTS}:/etc/docker/certs.d", True),
        ("2.2.9", "", True),  # unset: 2.2+ reads its default, two roots
        ("2.2.9", HOSTS, False),
        ("2.0.14", f"{HOSTS}:/etc/docker/certs.d", False),  # no transfer-service pulls
    ],
)
def test_apply_warns_when_cri_pulls_will_not_read_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], version: str, roots: str, warned: bool
) -> None:
    """A fake node with that version's real default config, config_path set to `roots`, and a
    containerd answering on the socket as that version (its CRI status as 2.x reports it)."""
    text = default_config(version).replace("config_path = ''", f"config_path = '{roots}'")
    default_node(tmp_path, version, text)
    fake_nodes.mkdir(tmp_path, HOSTS)
    config = fake_nodes.write(tmp_path, "/etc/spegel-node/config.toml", 'node_ip = "10.0.0.5"\n')
    sock = tmp_path / SOCK[1:]
    args = ("apply", "--root", str(tmp_path), "--config", str(config), "--no-gate")
    with FakeContainerd(sock, version=f"v{version}", config=cri_config("")):
        text_run = run_cli(capsys, *args)
        json_run = run_cli(capsys, *args, "-o", "json")
    assert text_run.code == 0 and json_run.code == 0, (text_run.err, json_run.err)
    warnings = json.loads(json_run.out)["warnings"]
    lines = [ln for ln in text_run.err.splitlines() if "transfer service" in ln]
    if not warned:
        assert lines == [] and not any("transfer service" in w for w in warnings), warnings
        return
    assert len(lines) == 1 and lines[0].startswith("warning: containerd "), text_run.err
    (warning,) = [w for w in warnings if "transfer service" in w]
    assert f"containerd {version}" in warning and "2 roots" in warning
    assert "will not be read for Kubernetes pulls" in warning
    assert f'config_path = "{HOSTS}"' in warning and "use_local_image_pull = true" in warning
    # apply still wrote the files (the warning does not change what it does)
    assert (tmp_path / HOSTS[1:] / "docker.io" / "hosts.toml").is_file()


# --- validate without --containerd-version: the node's containerd, else the strictest reading ---

IPV6_MIRROR = '[host."http://[fd00::5]:29999"]\n  capabilities = ["pull", "resolve"]\n'


def validate_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    result = run_cli(capsys, "validate", "-o", "json", *args)
    assert result.code in (0, 1), result.err
    return result.code, json.loads(result.out)


def test_validate_with_no_containerd_uses_the_strictest_reading_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts = fake_nodes.write(tmp_path, "/certs.d/docker.io/hosts.toml", IPV6_MIRROR)
    code, data = validate_json(capsys, "/certs.d", "--root", str(tmp_path))
    assert code == 1
    assert data["rules"]["strictest"] is True and data["rules"]["containerd_version"] is None
    assert data["rules"]["versions"] == list(VERSIONS)
    assert data["rules"]["source"].startswith("no containerd to ask: ")
    (finding,) = [f for f in data["findings"] if f["severity"] == "error"]
    assert finding["code"] == "table.bracket_in_key"
    assert finding["message"].endswith("(as containerd 1.6.20, 1.7.35)")
    text = run_cli(capsys, "validate", "/certs.d", "--root", str(tmp_path))
    assert text.out.splitlines()[-1] == (
        f"rules: strictest of containerd {', '.join(VERSIONS)} ({data['rules']['source']})"
    )
    # given a version, that version's rules: 2.x reads the IPv6 header
    code, data = validate_json(capsys, str(hosts), "--containerd-version", "2.2.9")
    assert code == 0 and data["findings"] == []
    assert data["rules"] == {
        "containerd_version": "2.2.9",
        "strictest": False,
        "versions": ["2.2.9"],
        "source": "--containerd-version",
    }


def test_validate_asks_the_nodes_containerd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nodes.make_containerd(tmp_path, config_path=HOSTS)
    fake_nodes.write(tmp_path, f"{HOSTS}/docker.io/hosts.toml", IPV6_MIRROR)
    # the socket is a placeholder, the root is not this machine: no version to be had
    code, data = validate_json(capsys, "--root", str(tmp_path))
    assert code == 1 and data["rules"]["strictest"] is True
    assert data["rules"]["source"] == (
        "containerd version unknown: containerd does not answer on its socket"
    )
    with FakeContainerd(tmp_path / SOCK[1:], version="v2.2.9", config=cri_config(HOSTS)):
        code, data = validate_json(capsys, "--root", str(tmp_path))
        text = run_cli(capsys, "validate", "--root", str(tmp_path))
    assert code == 0 and data["findings"] == [], data
    assert data["rules"]["containerd_version"] == "2.2.9"
    assert data["rules"]["source"] == "the running containerd"
    assert text.out.splitlines()[-1] == "rules: containerd 2.2.9 (the running containerd)"
    with FakeContainerd(tmp_path / SOCK[1:], version="1.7.35", config=cri_config(HOSTS)):
        code, data = validate_json(capsys, "--root", str(tmp_path))
    assert code == 1 and data["rules"]["containerd_version"] == "1.7.35"
    assert [f["code"] for f in data["findings"]] == ["table.bracket_in_key"]


# --- an IPv6 node_ip: the header form 1.x drops, refused on 1.x -------------------------------


def test_apply_refuses_an_ipv6_mirror_on_containerd_1_and_writes_it_on_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No hosts.toml form is read by both lines (judged with each version's own parser): 1.x
    drops `[host."http://[fd00::5]:29999"]`, 2.x ignores the inline-table form 1.x reads."""
    from support.judge import judge_dir, judge_texts

    fake_nodes.make_containerd(tmp_path, config_path=HOSTS)
    config = fake_nodes.write(
        tmp_path,
        "/etc/spegel-node/config.toml",
        'node_ip = "fd00::5"\nregistries = ["https://docker.io"]\n',
    )
    args = ("apply", "--root", str(tmp_path), "--config", str(config), "--no-gate")
    sock = tmp_path / SOCK[1:]
    with FakeContainerd(sock, version="1.6.20~ds1", config=cri_config(HOSTS)):
        refused = run_cli(capsys, *args)
    assert refused.code == 1, refused.err
    (line,) = refused.err.splitlines()
    assert "http://[fd00::5]:29999 is an IPv6 address" in line and "1.6.20~ds1" in line
    assert "set node_ip to an IPv4 address" in line
    assert not (tmp_path / HOSTS[1:] / "docker.io").exists()
    assert not (tmp_path / "var/lib/spegel-node").exists()  # nothing written, not even state
    with FakeContainerd(sock, version="2.3.7", config=cri_config(HOSTS)):
        written = run_cli(capsys, *args)
    assert written.code == 0, written.err
    hosts = tmp_path / HOSTS[1:]
    text = (hosts / "docker.io" / "hosts.toml").read_bytes()
    assert b'[host."http://[fd00::5]:29999"]' in text
    (old,) = judge_texts(DEBIAN, [text])
    assert old.status == "dropped" and "table key cannot contain ']'" in old.error, old
    for version in ("2.1.9", "2.3.7"):  # (2.0.x tries https first once dial_timeout is set)
        (new,) = judge_dir(version, hosts, ["docker.io"])
        assert new.status == "used" and new.hosts[0][0] == "http://[fd00::5]:29999/v2", new
    # validate says the same of the written file
    code, data = validate_json(
        capsys, str(hosts / "docker.io/hosts.toml"), "--containerd-version", DEBIAN
    )
    errors = [f["code"] for f in data["findings"] if f["severity"] == "error"]
    assert code == 1 and errors == ["table.bracket_in_key"]

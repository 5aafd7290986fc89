"""Layout detection on fake node trees of every flavor, overrides and live-process evidence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support import fake_nodes as fake
from support.fake_nodes import (
    BUILDERS,
    make_bottlerocket,
    make_containerd,
    make_containerd_custom,
    make_eks,
    make_k0s,
    make_k3s,
    make_kind,
    make_rke2,
    make_talos,
    mkdir,
    socket,
    write,
)

from spegel_node import layout as layout_mod
from spegel_node.layout import (
    FLAVORS,
    ContainerdProcess,
    Layout,
    NoLayout,
    detect,
    parse_containerd_cmdline,
    running_containerd,
)
from spegel_node.node import Node

K3S_AGENT = "/var/lib/rancher/k3s/agent"
RKE2_AGENT = "/var/lib/rancher/rke2/agent"
CONTENT = "io.containerd.content.v1.content"

# flavor: socket, config, hosts_dirs, config_path_set, content root, distro_owned
EXPECTED: dict[str, tuple[str, str, tuple[str, ...], bool, str, bool]] = {
    "k3s": (
        "/run/k3s/containerd/containerd.sock",
        f"{K3S_AGENT}/etc/containerd/config.toml",
        (f"{K3S_AGENT}/etc/containerd/certs.d",),
        True,
        f"{K3S_AGENT}/containerd",
        False,
    ),
    "rke2": (
        "/run/k3s/containerd/containerd.sock",
        f"{RKE2_AGENT}/etc/containerd/config.toml",
        (f"{RKE2_AGENT}/etc/containerd/certs.d",),
        True,
        f"{RKE2_AGENT}/containerd",
        False,
    ),
    "talos": (
        "/run/containerd/containerd.sock",
        "/etc/cri/containerd.toml",
        ("/etc/cri/conf.d/hosts",),
        True,
        "/var/lib/containerd",
        True,
    ),
    "k0s": (
        "/run/k0s/containerd.sock",
        "/etc/k0s/containerd.toml",
        (),
        False,
        "/var/lib/k0s/containerd",
        False,
    ),
    "microk8s": (
        "/var/snap/microk8s/common/run/containerd.sock",
        "/var/snap/microk8s/current/args/containerd.toml",
        ("/var/snap/microk8s/current/args/certs.d",),
        True,
        "/var/snap/microk8s/common/var/lib/containerd",
        False,
    ),
    "kind": (
        "/run/containerd/containerd.sock",
        "/etc/containerd/config.toml",
        ("/etc/containerd/certs.d",),
        True,
        "/var/lib/containerd",
        False,
    ),
    "eks": (
        "/run/containerd/containerd.sock",
        "/etc/containerd/config.toml",
        ("/etc/containerd/certs.d", "/etc/docker/certs.d"),
        True,
        "/var/lib/containerd",
        False,
    ),
    "bottlerocket": (
        "/run/containerd/containerd.sock",
        "/etc/containerd/config.toml",
        (),
        False,
        "/var/lib/containerd",
        True,
    ),
    "containerd": (
        "/run/containerd/containerd.sock",
        "/etc/containerd/config.toml",
        ("/etc/containerd/certs.d",),
        False,
        "/var/lib/containerd",
        False,
    ),
}
MARKER_LINE = {
    "k3s": "marker /var/lib/rancher/k3s",
    "rke2": "marker /var/lib/rancher/rke2",
    "talos": "marker /etc/os-release ID=talos",
    "k0s": "marker /etc/k0s",
    "microk8s": "marker /var/snap/microk8s",
    "kind": "marker /kind/version",
    "eks": "marker /usr/bin/nodeadm",
    "bottlerocket": "marker /etc/os-release ID=bottlerocket",
    "containerd": "marker /etc/kubernetes/kubelet.conf",
}


def on(root: Path, **kwargs: str) -> Layout:
    return detect(Node(root), processes=[], **kwargs)


def test_builders_cover_every_flavor() -> None:
    assert set(BUILDERS) == set(FLAVORS) == set(EXPECTED)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_flavor_detected(tmp_path: Path, flavor: str) -> None:
    BUILDERS[flavor](tmp_path)
    got = on(tmp_path)
    sock, config, dirs, config_path_set, root, owned = EXPECTED[flavor]
    assert got.flavor == flavor
    assert got.containerd_socket == sock
    assert got.containerd_config == config
    assert got.hosts_dirs == dirs
    assert got.hosts_dir == (dirs[0] if dirs else None)
    assert got.config_path_set is config_path_set
    assert got.content_dir == f"{root}/{CONTENT}"
    assert got.distro_owned is owned
    assert got.config is not None and got.config.path == config
    assert MARKER_LINE[flavor] in got.evidence
    assert f"socket {sock}" in got.evidence
    line = next(e for e in got.evidence if e.startswith(f"config {config} "))
    assert ("sets config_path" in line) is config_path_set
    doc = json.loads(json.dumps(got.to_json()))
    assert {
        "flavor",
        "containerd_socket",
        "hosts_dir",
        "hosts_dirs",
        "containerd_config",
        "config_path_set",
        "content_dir",
        "distro_owned",
        "evidence",
    } <= set(doc)
    assert str(tmp_path) not in json.dumps(doc)


def test_k3s_and_rke2_share_the_socket(tmp_path: Path) -> None:
    make_k3s(tmp_path / "k3s")
    make_rke2(tmp_path / "rke2")
    k3s, rke2 = on(tmp_path / "k3s"), on(tmp_path / "rke2")
    assert k3s.containerd_socket == rke2.containerd_socket == "/run/k3s/containerd/containerd.sock"
    assert (k3s.flavor, rke2.flavor) == ("k3s", "rke2")
    assert rke2.containerd_config == f"{RKE2_AGENT}/etc/containerd/config.toml"
    assert rke2.hosts_dir == f"{RKE2_AGENT}/etc/containerd/certs.d"


def test_rke2_with_leftover_k3s_dir_picks_the_one_with_a_config(tmp_path: Path) -> None:
    make_rke2(tmp_path)
    mkdir(tmp_path, "/etc/rancher/k3s")
    assert on(tmp_path).flavor == "rke2"


@pytest.mark.parametrize("version", [2, 3])
def test_k3s_config_versions(tmp_path: Path, version: int) -> None:
    make_k3s(tmp_path, version=version)
    got = on(tmp_path)
    assert got.config is not None and got.config.version == version
    assert got.hosts_dir == f"{K3S_AGENT}/etc/containerd/certs.d"


def test_kind_wins_over_kubeadm_marker(tmp_path: Path) -> None:
    make_kind(tmp_path)
    assert (tmp_path / "etc/kubernetes/kubelet.conf").exists()
    assert on(tmp_path).flavor == "kind"


def test_old_kind_without_config_path(tmp_path: Path) -> None:
    make_kind(tmp_path, config_path=False)
    got = on(tmp_path)
    assert got.config_path_set is False
    assert got.hosts_dir == "/etc/containerd/certs.d"
    assert "config /etc/containerd/config.toml does not set config_path" in got.evidence


def test_eks_v2_config(tmp_path: Path) -> None:
    make_eks(tmp_path, version=2)
    got = on(tmp_path)
    assert got.hosts_dirs == ("/etc/containerd/certs.d", "/etc/docker/certs.d")
    assert got.config is not None and got.config.discard_unpacked_layers is True


def test_k0s_dropin_config_path(tmp_path: Path) -> None:
    make_k0s(tmp_path, dropin_config_path="/etc/k0s/containerd.d/certs.d")
    got = on(tmp_path)
    assert got.hosts_dir == "/etc/k0s/containerd.d/certs.d"
    assert got.config_path_set is True
    assert any(e.startswith("config /etc/k0s/containerd.toml merged from") for e in got.evidence)


def test_talos_customization_and_distro_owned(tmp_path: Path) -> None:
    make_talos(tmp_path, customization=True)
    got = on(tmp_path)
    assert got.distro_owned is True
    assert got.config is not None and got.config.discard_unpacked_layers is False


def test_talos_without_readable_config_assumes_config_path(tmp_path: Path) -> None:
    make_talos(tmp_path)
    (tmp_path / "etc/cri/containerd.toml").unlink()
    got = on(tmp_path)
    assert (got.containerd_config, got.config) == (None, None)
    assert got.config_path_set is True
    assert got.hosts_dir == "/etc/cri/conf.d/hosts"
    assert "config_path assumed: talos sets it by default" in got.evidence


def test_bottlerocket_mirrors(tmp_path: Path) -> None:
    make_bottlerocket(tmp_path, mirrors=True)
    got = on(tmp_path)
    assert got.hosts_dir is None
    assert got.config is not None and got.config.registry_mirrors is True


def test_plain_containerd_unusual_config_path(tmp_path: Path) -> None:
    make_containerd_custom(tmp_path)
    got = on(tmp_path)
    assert got.flavor == "containerd"
    assert got.hosts_dir == "/opt/registry-hosts"
    assert got.hosts_dirs == ("/opt/registry-hosts", "/etc/docker/certs.d")
    assert got.config_path_set is True
    line = "config /etc/containerd/config.toml sets config_path " + fake.CUSTOM_CONFIG_PATH
    assert line in got.evidence


def test_plain_containerd_without_config_file(tmp_path: Path) -> None:
    make_containerd(tmp_path, write_config=False)
    got = on(tmp_path)
    assert got.flavor == "containerd"
    assert (got.containerd_config, got.config) == (None, None)
    assert got.config_path_set is False
    assert got.hosts_dir == "/etc/containerd/certs.d"
    assert "no containerd config at /etc/containerd/config.toml" in got.evidence


def test_socket_alone_is_plain_containerd(tmp_path: Path) -> None:
    socket(tmp_path, "/run/containerd/containerd.sock")
    got = on(tmp_path)
    assert got.flavor == "containerd"
    assert got.evidence[0] == "socket /run/containerd/containerd.sock"


def test_config_grpc_address_wins_over_convention(tmp_path: Path) -> None:
    write(
        tmp_path,
        "/etc/containerd/config.toml",
        'version = 2\n[grpc]\naddress = "/run/custom.sock"\n',
    )
    assert on(tmp_path).containerd_socket == "/run/custom.sock"


@pytest.mark.parametrize("extra", ["", "kubelet"])
def test_no_containerd_is_no_layout(tmp_path: Path, extra: str) -> None:
    if extra:
        write(tmp_path, "/etc/kubernetes/kubelet.conf", "")
    with pytest.raises(NoLayout) as e:
        on(tmp_path)
    message = str(e.value)
    assert "/run/containerd/containerd.sock" in message
    assert "/var/lib/rancher/k3s" in message and "ID=talos" in message
    assert e.value.exit_code == 1


def test_missing_import_is_evidence(tmp_path: Path) -> None:
    make_k0s(tmp_path, cri_file=False)
    got = on(tmp_path)
    line = (
        "config /etc/k0s/containerd.toml imports /run/k0s/containerd-cri.toml, which does not exist"
    )
    assert any(e.startswith(line) for e in got.evidence)


def test_invalid_config_still_gives_a_layout(tmp_path: Path) -> None:
    make_containerd(tmp_path)
    write(tmp_path, "/etc/containerd/config.toml", "version = [\n")
    got = on(tmp_path)
    assert got.containerd_config == "/etc/containerd/config.toml"
    assert got.config is None
    line = next(e for e in got.evidence if e.startswith("config unreadable"))
    assert "/etc/containerd/config.toml: is not valid TOML" in line
    assert str(tmp_path) not in line


# --- overrides -----------------------------------------------------------------------------------


def test_overrides_win(tmp_path: Path) -> None:
    make_k3s(tmp_path)
    write(
        tmp_path,
        "/etc/alt/containerd.toml",
        "version = 3\n[plugins.'io.containerd.cri.v1.images'"
        '.registry]\nconfig_path = "/srv/hosts:/etc/containerd/certs.d"\n',
    )
    got = on(
        tmp_path,
        hosts_dir="/etc/containerd/certs.d",
        containerd_socket="/run/alt.sock",
        containerd_config="/etc/alt/containerd.toml",
    )
    assert got.flavor == "k3s"
    assert got.hosts_dir == "/etc/containerd/certs.d"
    assert got.hosts_dirs == ("/etc/containerd/certs.d", "/srv/hosts")
    assert got.containerd_socket == "/run/alt.sock"
    assert got.containerd_config == "/etc/alt/containerd.toml"
    for line in (
        "override --hosts-dir /etc/containerd/certs.d",
        "override --containerd-socket /run/alt.sock",
        "override --containerd-config /etc/alt/containerd.toml",
    ):
        assert line in got.evidence
    assert "socket /run/alt.sock" not in got.evidence  # it does not exist


def test_override_on_unknown_node(tmp_path: Path) -> None:
    got = on(tmp_path, hosts_dir="/srv/hosts")
    assert got.flavor == "containerd"
    assert got.hosts_dirs == ("/srv/hosts", "/etc/containerd/certs.d")
    assert got.evidence == (
        "no containerd config at /etc/containerd/config.toml",
        "override --hosts-dir /srv/hosts",
    )


def test_override_missing_config_is_still_reported(tmp_path: Path) -> None:
    make_containerd(tmp_path)
    got = on(tmp_path, containerd_config="/etc/nope.toml")
    assert (got.containerd_config, got.config) == ("/etc/nope.toml", None)


# --- the running containerd ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (  # k3s starts containerd with both
            [
                "containerd",
                "-c",
                f"{K3S_AGENT}/etc/containerd/config.toml",
                "-a",
                "/run/k3s/containerd/containerd.sock",
                "--state",
                "/run/k3s/containerd",
                "--root",
                f"{K3S_AGENT}/containerd",
            ],
            (
                f"{K3S_AGENT}/etc/containerd/config.toml",
                "/run/k3s/containerd/containerd.sock",
                f"{K3S_AGENT}/containerd",
            ),
        ),
        (  # k0s uses the = form
            [
                "/var/lib/k0s/bin/containerd",
                "--root=/var/lib/k0s/containerd",
                "--state=/run/k0s/containerd",
                "--address=/run/k0s/containerd.sock",
                "--log-level=info",
                "--config=/etc/k0s/containerd.toml",
            ],
            ("/etc/k0s/containerd.toml", "/run/k0s/containerd.sock", "/var/lib/k0s/containerd"),
        ),
        (["/usr/bin/containerd"], (None, None, None)),
        (
            ["containerd", "-config", "/a.toml", "-a=/b.sock", "--log-level", "debug"],
            ("/a.toml", "/b.sock", None),
        ),
        (["containerd", "--config"], (None, None, None)),  # value missing
    ],
)
def test_parse_containerd_cmdline(argv: list[str], expected: tuple[str | None, ...]) -> None:
    got = parse_containerd_cmdline(argv, pid=7)
    assert got is not None
    assert (got.config, got.address, got.root) == expected
    assert got.pid == 7


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["containerd-shim-runc-v2", "-namespace", "k8s.io"],
        ["containerd", "config", "dump"],
        ["/usr/bin/dockerd", "--containerd", "/run/containerd/containerd.sock"],
    ],
)
def test_parse_not_a_containerd_daemon(argv: list[str]) -> None:
    assert parse_containerd_cmdline(argv) is None


def test_describe() -> None:
    p = ContainerdProcess(pid=42, config="/c.toml", address="/a.sock", root=None)
    assert p.describe() == "process containerd --config /c.toml --address /a.sock (pid 42)"


def test_process_is_the_strongest_evidence(tmp_path: Path) -> None:
    make_containerd(tmp_path)
    write(
        tmp_path,
        "/etc/containerd/custom.toml",
        'version = 2\n[plugins."io.containerd.grpc.v1.cri"'
        '.registry]\nconfig_path = "/srv/certs.d"\n',
    )
    proc = ContainerdProcess(
        pid=1, config="/etc/containerd/custom.toml", address="/run/c.sock", root="/data/containerd"
    )
    got = detect(Node(tmp_path), processes=[proc])
    assert got.containerd_config == "/etc/containerd/custom.toml"
    assert got.containerd_socket == "/run/c.sock"
    assert got.hosts_dir == "/srv/certs.d"
    assert got.content_dir == f"/data/containerd/{CONTENT}"
    assert proc.describe() in got.evidence


def test_process_alone_is_plain_containerd(tmp_path: Path) -> None:
    proc = ContainerdProcess(pid=1, config=None, address=None, root=None)
    got = detect(Node(tmp_path), processes=[proc])
    assert got.flavor == "containerd"
    assert "process containerd (pid 1)" in got.evidence


def test_talos_picks_the_cri_containerd_not_the_system_one(tmp_path: Path) -> None:
    make_talos(tmp_path)
    system = ContainerdProcess(
        1, "/system/etc/containerd.toml", "/system/run/containerd/containerd.sock", None
    )
    cri = ContainerdProcess(2, "/etc/cri/containerd.toml", "/run/containerd/containerd.sock", None)
    got = detect(Node(tmp_path), processes=[system, cri])
    assert cri.describe() in got.evidence and system.describe() not in got.evidence


def test_process_decides_between_leftover_markers(tmp_path: Path) -> None:
    make_k3s(tmp_path)
    make_rke2(tmp_path)
    proc = ContainerdProcess(
        3,
        f"{RKE2_AGENT}/etc/containerd/config.toml",
        "/run/k3s/containerd/containerd.sock",
        f"{RKE2_AGENT}/containerd",
    )
    assert detect(Node(tmp_path), processes=[]).flavor == "k3s"
    assert detect(Node(tmp_path), processes=[proc]).flavor == "rke2"


def test_processes_are_not_read_for_a_mounted_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom() -> list[ContainerdProcess]:
        raise AssertionError("must not list processes for a non-live root")

    monkeypatch.setattr(layout_mod, "running_containerd", boom)
    make_k3s(tmp_path)
    assert detect(Node(tmp_path)).flavor == "k3s"


@pytest.mark.skipif(not shutil.which("sh") or not Path("/proc/self").exists(), reason="needs /proc")
def test_running_containerd_reads_live_command_lines(tmp_path: Path) -> None:
    # A process whose argv[0] is "containerd" (sh runs it; `$0` takes the --config=... word).
    args = [
        "containerd",
        "-c",
        "sleep 30; true",
        "--config=/x/config.toml",
        "--address",
        str(tmp_path / "c.sock"),
    ]
    proc = subprocess.Popen(args, executable="/bin/sh")
    try:
        for _ in range(50):
            found = [p for p in running_containerd() if p.pid == proc.pid]
            if found:
                break
            time.sleep(0.02)
        assert found, "the fake containerd was not listed"
        assert found[0].config == "/x/config.toml"
        assert found[0].address == str(tmp_path / "c.sock")
    finally:
        proc.kill()
        proc.wait()
    assert os.getpid() not in {p.pid for p in running_containerd()}


def test_overrides_ignore_a_different_running_containerd(tmp_path: Path) -> None:
    # Two containerds on one machine: the one the operator names wins, not whichever runs.
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv/config.toml").write_text('version = 2\nroot = "/srv/ctr-root"\n')
    other = ContainerdProcess(42, "/etc/other/config.toml", None, "/var/lib/other-containerd")
    layout = detect(
        Node(tmp_path),
        containerd_config="/srv/config.toml",
        containerd_socket="/srv/ctr.sock",
        processes=[other],
    )
    assert layout.content_dir == "/srv/ctr-root/io.containerd.content.v1.content"
    assert not any("pid 42" in line for line in layout.evidence)

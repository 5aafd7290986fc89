"""One record per node flavor: its paths, markers and habits (REFERENCE section 3).

Every module reads a flavor's facts from its record here; none branches on a flavor's name for
them. Adding a flavor is adding a record (and a fake node in tests/support/fake_nodes.py).
What the distro wants done *instead* of writing (Talos, Bottlerocket) is text, and lives in
instructions.py, keyed by `Flavor.owner`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
DEFAULT_ROOT = "/var/lib/containerd"
# Where to write when a node names no hosts dir: the first entry of containerd 2.2's default
# config_path, and the convention before it.
FALLBACK_HOSTS_DIR = "/etc/containerd/certs.d"
DEFAULT_RESTART = "sudo systemctl restart containerd"
COMMON_CONTAINERD = ("/usr/bin/containerd", "/usr/local/bin/containerd")
COMMON_CRICTL = ("/usr/bin/crictl", "/usr/local/bin/crictl")


# Where a person changes containerd's CRI settings on a flavor (the remediation text and
# configure-containerd follow it): its config file itself, a drop-in the distro merges, the
# distro's template or cluster/node config, or the OS's own source of truth.
CriConfigVia = Literal[
    "file",
    "dropin",
    "rancher-template",
    "microk8s-template",
    "kind-patch",
    "nodeadm",
    "machine-config",
    "api-settings",
]


@dataclass(frozen=True)
class ConfigDropin:
    """A distro that merges drop-ins into the CRI config it generates (k0s)."""

    path: str  # the drop-in spegel-node writes
    managed_marker: str  # a line of the main config telling that the distro generates it
    generated: str  # the CRI config the distro generated: the drop-in follows its version


@dataclass(frozen=True)
class Flavor:
    name: str
    title: str = ""  # as the distro spells itself in prose (defaults to name)
    socket: str = DEFAULT_SOCKET
    config: str = DEFAULT_CONTAINERD_CONFIG
    hosts_dir: str | None = (
        "/etc/containerd/certs.d"  # conventional; ':'-separated like config_path
    )
    root: str = DEFAULT_ROOT  # containerd root (content store parent)
    sets_config_path: bool = False  # the distro sets config_path by default
    markers: tuple[str, ...] = ()  # node paths whose presence tells this flavor
    os_id: str = ""  # or: told by /etc/os-release ID
    # Who writes the hosts dir: "agent" (spegel-node may), or the distro's own source of truth
    # ("machine-config" on Talos, "api-settings" on Bottlerocket), where the agent must not.
    owner: str = "agent"
    registries_yaml: bool = False  # k3s/RKE2: regenerates registries.yaml's dirs at every start
    embedded_registry: bool = False  # k3s/RKE2 can embed Spegel themselves
    discards_unpacked_layers: bool = False  # discard_unpacked_layers = true by default
    configurable: bool = False  # `configure-containerd` edits this flavor's containerd config
    restart: str = DEFAULT_RESTART  # how containerd picks up config changes (`# comment` allowed)
    containerd_bins: tuple[str, ...] = ()  # flavor-specific binaries, before COMMON_CONTAINERD
    crictl_bins: tuple[str, ...] = ()
    cri_config_via: CriConfigVia = "file"
    dropin: ConfigDropin | None = None
    services: tuple[str, ...] = ("containerd.service",)  # the units that run its containerd
    evidence_markers: tuple[str, ...] = ()  # shown as evidence, never decide the flavor

    @property
    def display(self) -> str:
        return self.title or self.name

    @property
    def distro_owned(self) -> bool:
        return self.owner != "agent"


def _rancher(distro: str, title: str, bin_dir: str, restart: str) -> Flavor:
    agent = f"/var/lib/rancher/{distro}/agent"
    return Flavor(
        distro,
        title=title,
        socket="/run/k3s/containerd/containerd.sock",  # RKE2 uses k3s's path too
        config=f"{agent}/etc/containerd/config.toml",
        hosts_dir=f"{agent}/etc/containerd/certs.d",
        root=f"{agent}/containerd",
        sets_config_path=True,
        markers=(f"/var/lib/rancher/{distro}", f"/etc/rancher/{distro}"),
        registries_yaml=True,
        embedded_registry=True,
        restart=restart,
        containerd_bins=(f"{bin_dir}/containerd",),
        crictl_bins=(f"{bin_dir}/crictl",),
        cri_config_via="rancher-template",
    )


# In detection order: when several flavors' markers match and nothing else decides, the first
# wins. Plain containerd, last, has no markers of its own.
FLAVORS: dict[str, Flavor] = {
    f.name: f
    for f in (
        Flavor(
            "talos",
            title="Talos",
            config="/etc/cri/containerd.toml",
            hosts_dir="/etc/cri/conf.d/hosts",
            sets_config_path=True,
            os_id="talos",
            owner="machine-config",
            discards_unpacked_layers=True,
            restart="talosctl --nodes NODE service cri restart",
            cri_config_via="machine-config",
        ),
        Flavor(
            "bottlerocket",
            title="Bottlerocket",
            hosts_dir=None,  # rendered from its API settings
            os_id="bottlerocket",
            owner="api-settings",
            restart="apiclient reboot",
            cri_config_via="api-settings",
        ),
        Flavor(
            "kind",
            sets_config_path=False,  # only from kind v0.27
            markers=("/kind/version",),
            discards_unpacked_layers=True,
            configurable=True,
            restart="kind delete cluster && kind create cluster --config kind.yaml",
            cri_config_via="kind-patch",
        ),
        _rancher(
            "k3s",
            "k3s",
            "/var/lib/rancher/k3s/data/current/bin",
            "sudo systemctl restart k3s   # k3s-agent on agent nodes",
        ),
        _rancher(
            "rke2",
            "RKE2",
            "/var/lib/rancher/rke2/bin",
            "sudo systemctl restart rke2-server   # rke2-agent on agent nodes",
        ),
        Flavor(
            "k0s",
            socket="/run/k0s/containerd.sock",
            config="/etc/k0s/containerd.toml",
            hosts_dir=None,
            root="/var/lib/k0s/containerd",
            markers=("/etc/k0s", "/var/lib/k0s"),
            configurable=True,
            restart="sudo systemctl restart k0sworker   # k0scontroller on controller+worker nodes",
            containerd_bins=("/var/lib/k0s/bin/containerd",),
            cri_config_via="dropin",
            # k0s docs, "k0s managed dynamic runtime configuration"
            dropin=ConfigDropin(
                "/etc/k0s/containerd.d/spegel-node.toml",
                "# k0s_managed=true",
                "/run/k0s/containerd-cri.toml",
            ),
            services=("k0sworker.service", "k0scontroller.service"),
        ),
        Flavor(
            "microk8s",
            title="MicroK8s",
            socket="/var/snap/microk8s/common/run/containerd.sock",
            config="/var/snap/microk8s/current/args/containerd.toml",
            hosts_dir="/var/snap/microk8s/current/args/certs.d",
            root="/var/snap/microk8s/common/var/lib/containerd",
            sets_config_path=True,
            markers=("/var/snap/microk8s", "/snap/microk8s"),
            restart="sudo snap restart microk8s",
            cri_config_via="microk8s-template",
            containerd_bins=("/snap/microk8s/current/bin/containerd",),
        ),
        Flavor(
            "eks",
            hosts_dir="/etc/containerd/certs.d:/etc/docker/certs.d",
            sets_config_path=True,
            markers=("/usr/bin/nodeadm", "/etc/eks"),
            discards_unpacked_layers=True,
            cri_config_via="nodeadm",
        ),
        # kubeadm and the like with the distro's containerd; containerd < 2.2 has no default
        # config_path, so the hosts dir is the convention only.
        Flavor(
            "containerd",
            configurable=True,
            evidence_markers=("/etc/kubernetes/kubelet.conf",),  # kubeadm's
        ),
    )
}
PLAIN = FLAVORS["containerd"]


def flavor(name: str | None) -> Flavor:
    """The record for `name`; plain containerd for None or an unknown name."""
    return FLAVORS.get(name or "", PLAIN)

"""One record per node flavor: its paths, markers and habits (REFERENCE section 3).

Every module reads a flavor's facts from its record here; none branches on a flavor's name for
them. Adding a flavor is adding a record (and a fake node in tests/support/fake_nodes.py).
What the distro wants done *instead* of writing (Talos, Bottlerocket) is text, and lives in
instructions.py, keyed by `Flavor.owner`.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
DEFAULT_CONFIG = "/etc/containerd/config.toml"
DEFAULT_ROOT = "/var/lib/containerd"
# Where to write when a node names no hosts dir: the first entry of containerd 2.2's default
# config_path, and the convention before it.
FALLBACK_HOSTS_DIR = "/etc/containerd/certs.d"
DEFAULT_RESTART = "sudo systemctl restart containerd"
COMMON_CONTAINERD = ("/usr/bin/containerd", "/usr/local/bin/containerd")
COMMON_CRICTL = ("/usr/bin/crictl", "/usr/local/bin/crictl")


@dataclass(frozen=True)
class Flavor:
    name: str
    socket: str = DEFAULT_SOCKET
    config: str = DEFAULT_CONFIG
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

    @property
    def distro_owned(self) -> bool:
        return self.owner != "agent"


def _rancher(distro: str, bin_dir: str, restart: str) -> Flavor:
    agent = f"/var/lib/rancher/{distro}/agent"
    return Flavor(
        distro,
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
    )


# In detection order: when several flavors' markers match and nothing else decides, the first
# wins. Plain containerd, last, has no markers of its own.
FLAVORS: dict[str, Flavor] = {
    f.name: f
    for f in (
        Flavor(
            "talos",
            config="/etc/cri/containerd.toml",
            hosts_dir="/etc/cri/conf.d/hosts",
            sets_config_path=True,
            os_id="talos",
            owner="machine-config",
            discards_unpacked_layers=True,
            restart="talosctl --nodes NODE service cri restart",
        ),
        Flavor(
            "bottlerocket",
            hosts_dir=None,  # rendered from its API settings
            os_id="bottlerocket",
            owner="api-settings",
            restart="apiclient reboot",
        ),
        Flavor(
            "kind",
            sets_config_path=False,  # only from kind v0.27
            markers=("/kind/version",),
            discards_unpacked_layers=True,
            configurable=True,
            restart="kind delete cluster && kind create cluster --config kind.yaml",
        ),
        _rancher(
            "k3s",
            "/var/lib/rancher/k3s/data/current/bin",
            "sudo systemctl restart k3s   # k3s-agent on agent nodes",
        ),
        _rancher(
            "rke2",
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
        ),
        Flavor(
            "microk8s",
            socket="/var/snap/microk8s/common/run/containerd.sock",
            config="/var/snap/microk8s/current/args/containerd.toml",
            hosts_dir="/var/snap/microk8s/current/args/certs.d",
            root="/var/snap/microk8s/common/var/lib/containerd",
            sets_config_path=True,
            markers=("/var/snap/microk8s", "/snap/microk8s"),
            restart="sudo snap restart microk8s",
            containerd_bins=("/snap/microk8s/current/bin/containerd",),
        ),
        Flavor(
            "eks",
            hosts_dir="/etc/containerd/certs.d:/etc/docker/certs.d",
            sets_config_path=True,
            markers=("/usr/bin/nodeadm", "/etc/eks"),
            discards_unpacked_layers=True,
        ),
        # kubeadm and the like with the distro's containerd; containerd < 2.2 has no default
        # config_path, so the hosts dir is the convention only.
        Flavor("containerd", configurable=True),
    )
}
PLAIN = FLAVORS["containerd"]


def flavor(name: str | None) -> Flavor:
    """The record for `name`; plain containerd for None or an unknown name."""
    return FLAVORS.get(name or "", PLAIN)

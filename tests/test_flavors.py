"""The flavor records pin REFERENCE section 3; every module reads them (no name branches)."""

from __future__ import annotations

from support.fake_nodes import BUILDERS

from spegel_node.flavors import FLAVORS, PLAIN, flavor


def names(predicate: object) -> set[str]:
    return {f.name for f in FLAVORS.values() if predicate(f)}  # type: ignore[operator]


def test_every_flavor_has_a_fake_node() -> None:
    assert set(FLAVORS) == set(BUILDERS)


def test_k3s_and_rke2_share_a_socket_and_differ_by_markers() -> None:
    k3s, rke2 = FLAVORS["k3s"], FLAVORS["rke2"]
    assert k3s.socket == rke2.socket == "/run/k3s/containerd/containerd.sock"
    assert k3s.markers == ("/var/lib/rancher/k3s", "/etc/rancher/k3s")
    assert rke2.markers == ("/var/lib/rancher/rke2", "/etc/rancher/rke2")
    assert k3s.hosts_dir == "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"


def test_who_owns_the_hosts_dir() -> None:
    assert names(lambda f: f.distro_owned) == {"talos", "bottlerocket"}
    assert FLAVORS["talos"].owner == "machine-config"
    assert FLAVORS["bottlerocket"].owner == "api-settings"
    assert names(lambda f: f.os_id) == {"talos", "bottlerocket"}


def test_habits() -> None:
    assert names(lambda f: f.discards_unpacked_layers) == {"talos", "kind", "eks"}
    assert names(lambda f: f.configurable) == {"containerd", "kind", "k0s"}
    assert names(lambda f: f.registries_yaml) == {"k3s", "rke2"}
    assert names(lambda f: f.sets_config_path) == {"k3s", "rke2", "talos", "microk8s", "eks"}


def test_detection_order_puts_os_ids_first_and_plain_containerd_last() -> None:
    order = list(FLAVORS)
    assert order[:2] == ["talos", "bottlerocket"] and order[-1] == "containerd"
    assert not PLAIN.markers and not PLAIN.os_id


def test_unknown_or_missing_name_is_plain_containerd() -> None:
    assert flavor(None) is PLAIN and flavor("nomad") is PLAIN and flavor("k3s").name == "k3s"

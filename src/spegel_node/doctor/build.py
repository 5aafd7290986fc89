"""Which checks this node gets, in the order they are shown. Building is separate from running."""

from __future__ import annotations

from spegel_node.doctor.checks.agent import AgentDrift, AgentGate, AgentTimer
from spegel_node.doctor.checks.containerd import (
    ConfigPath,
    ContainerdConfigReadable,
    ContainerdSocket,
    DiscardUnpackedLayers,
    LocalImagePull,
)
from spegel_node.doctor.checks.distro import EmbeddedRegistry, RegistriesYaml
from spegel_node.doctor.checks.hosts import HostsRegistry, HostsShadowing
from spegel_node.doctor.checks.layout import LayoutDetected
from spegel_node.doctor.checks.spegel import SpegelImage, SpegelMetrics, SpegelReadyz, SpegelV2
from spegel_node.doctor.checks.stale import HostsStale
from spegel_node.doctor.facts import Facts
from spegel_node.doctor.model import Check
from spegel_node.flavors import flavor as flavor_record

# Every fixed check id, whichever node runs it (docs/checks.md). `hosts.<registry>` ids come from
# the node's registries. `doctor --ignore` warns about a pattern that matches none of these
# and none of the node's own ids (a typo), without refusing it.
KNOWN_IDS = (
    "layout.detected",
    "containerd.socket",
    "containerd.config",
    "containerd.config_path",
    "containerd.discard_unpacked_layers",
    "containerd.local_image_pull",
    "hosts.shadowing",
    "hosts.stale",
    "spegel.v2",
    "spegel.readyz",
    "spegel.metrics",
    "spegel.image",
    "k3s.embedded_registry",
    "k3s.registries_yaml",
    "agent.drift",
    "agent.gate",
    "agent.timer",
)


def build_checks(facts: Facts) -> list[Check]:
    """One `hosts.<registry>` per mirrored registry, `spegel.image` with --image, `k3s.*` only
    on k3s and RKE2. Reads the layout (fast, local) to know the registries and the flavor."""
    checks: list[Check] = [
        LayoutDetected(),
        ContainerdSocket(),
        ContainerdConfigReadable(),
        ConfigPath(),
        DiscardUnpackedLayers(),
        LocalImagePull(),
    ]
    checks += [HostsRegistry(target) for target in facts.hosts_targets()]
    checks += [HostsShadowing(), HostsStale(), SpegelV2(), SpegelReadyz(), SpegelMetrics()]
    if facts.image is not None:
        checks.append(SpegelImage(facts.image))
    record = flavor_record(facts.flavor)
    if record.embedded_registry:
        checks.append(EmbeddedRegistry(record.name))
    if record.registries_yaml:
        checks.append(RegistriesYaml(record.name))
    checks += [AgentDrift(), AgentGate(), AgentTimer()]
    return checks

"""layout.detected: which node this is and where its containerd keeps things."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from spegel_node.doctor.facts import Facts
from spegel_node.doctor.model import Check, CheckResult
from spegel_node.doctor.remedy import config_file


@dataclass(frozen=True)
class LayoutDetected(Check):
    area: ClassVar[str] = "layout"

    @property
    def id(self) -> str:
        return "layout.detected"

    def run(self, facts: Facts) -> CheckResult:
        layout = facts.layout
        if layout is None:
            return self.fail(
                "no containerd layout found on this node",
                f"{facts.layout_error}\n"
                "For a layout spegel-node does not know, set hosts_dir, containerd_socket and "
                f"containerd_config in {config_file(facts)} (or pass --hosts-dir, "
                "--containerd-socket, --containerd-config).",
            )
        owned = " (the distro owns the hosts dir)" if layout.distro_owned else ""
        return self.passed(
            f"{layout.flavor}{owned}: socket {layout.containerd_socket}, "
            f"config {layout.containerd_config or 'none'}, hosts dir {facts.hosts_dir}",
            layout.evidence,
        )

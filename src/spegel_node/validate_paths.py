"""Resolve `validate` arguments (node paths: files or hosts dirs) and collect the findings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from spegel_node.errors import BadInput
from spegel_node.node import Node
from spegel_node.validate import Finding, validate_file, validate_hosts_dir


def validate_targets(
    node: Node, targets: Sequence[str], version: tuple[int, int, int] | None
) -> tuple[list[Finding], int]:
    """Findings for every target, and how many hosts.toml files were read."""
    findings: list[Finding] = []
    files = 0
    for target in targets:
        path = node.path(target) if target.startswith("/") else Path(target)
        if path.is_dir():
            found = validate_hosts_dir(
                path, display=node.display, containerd_version=version, root=node.root
            )
            files += sum(1 for _ in path.glob("*/hosts.toml"))
        elif path.exists():
            found = validate_file(
                path, display_path=node.display(path), containerd_version=version, root=node.root
            )
            files += 1
        else:
            raise BadInput(f"{target}: no such file or directory")
        findings.extend(found)
    return findings, files

"""Resolve `validate` arguments (node paths: files or hosts dirs) and collect the findings.

Which containerd's rules apply: `--containerd-version`, else the node's containerd (its socket,
on this machine also `containerd --version`, as doctor asks), else the strictest reading: every
version of the measured matrix at once, a finding an error when any of them drops the file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spegel_node.compat import zip_strict
from spegel_node.errors import BadInput
from spegel_node.node import Node
from spegel_node.validate import ERROR, Finding, Version, validate_file, validate_hosts_dir

# The versions measured against their own parsers (docs/containerd-matrix.md); together they
# cover every rule set validate knows (go-toml v1/v2, host-less files, referrers, dial_timeout).
STRICTEST: tuple[Version, ...] = (
    (1, 6, 20),
    (1, 7, 35),
    (2, 0, 14),
    (2, 1, 9),
    (2, 2, 9),
    (2, 3, 7),
)


@dataclass(frozen=True)
class Rules:
    """Whose rules validate applies, and why."""

    version: Version | None  # None: the strictest reading (STRICTEST)
    source: str  # "--containerd-version", "the running containerd", why none is known

    @property
    def label(self) -> str:
        if self.version is None:
            return "strictest of containerd " + ", ".join(_ver(v) for v in STRICTEST)
        return f"containerd {_ver(self.version)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "containerd_version": _ver(self.version) if self.version else None,
            "strictest": self.version is None,
            "versions": [_ver(v) for v in (STRICTEST if self.version is None else [self.version])],
            "source": self.source,
        }


def node_rules(node: Node, layout_of: Callable[[], tuple[Any, Any]]) -> Rules:
    """The node's containerd version, as doctor finds it; else the strictest reading.

    `layout_of` returns (settings, layout); a node with no containerd layout (or no readable
    settings) has no containerd to ask."""
    from spegel_node.doctor.facts import Facts
    from spegel_node.errors import SpegelNodeError
    from spegel_node.layout import NoLayout

    try:
        settings, layout = layout_of()
    except NoLayout:
        return Rules(None, "no containerd to ask: no containerd layout found on the node")
    except SpegelNodeError as e:
        return Rules(None, f"no containerd to ask: {str(e).splitlines()[0]}")
    try:
        found = Facts(node, settings, layout=layout).containerd_version
    except Exception as e:  # a version that cannot be asked: still validate, strictly
        return Rules(None, f"containerd version unknown ({type(e).__name__})")
    if found.version is None:
        return Rules(None, f"containerd version unknown: {found.source}")
    return Rules(found.version, found.source)


def validate_targets(
    node: Node, targets: Sequence[str], version: Version | None
) -> tuple[list[Finding], int]:
    """Findings for every target, and how many hosts.toml files were read; `version` None: the
    strictest reading (see `strictest`)."""
    if version is None:
        runs = [_validate_targets(node, targets, v) for v in STRICTEST]
        return strictest([found for found, _ in runs]), runs[0][1]
    return _validate_targets(node, targets, version)


def strictest(per_version: Sequence[list[Finding]]) -> list[Finding]:
    """One list from the findings of each STRICTEST version: per (path, line, code) the most
    severe, naming the versions it holds for when not all of them agree."""
    groups: dict[tuple[str, int | None, str], list[tuple[Version, Finding]]] = {}
    for v, found in zip_strict(STRICTEST, per_version):
        for f in found:
            groups.setdefault((f.path, f.line, f.code), []).append((v, f))
    out: list[Finding] = []
    for entries in groups.values():
        severe = [e for e in entries if e[1].severity == ERROR] or entries
        first = severe[0][1]
        if len(severe) == len(STRICTEST):
            out.append(first)
            continue
        versions = ", ".join(_ver(v) for v, _ in severe)
        message = f"{first.message} (as containerd {versions})"
        out.append(Finding(first.path, first.line, first.severity, first.code, message))
    paths = list(dict.fromkeys(f.path for f in out))
    return sorted(out, key=lambda f: (paths.index(f.path), f.line or 0))


def _validate_targets(
    node: Node, targets: Sequence[str], version: Version
) -> tuple[list[Finding], int]:
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


def _ver(v: Version) -> str:
    return ".".join(str(n) for n in v)

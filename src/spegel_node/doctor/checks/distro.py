"""k3s.* (for k3s and RKE2; the summary names the distro): the embedded Spegel, and the registries
that k3s/RKE2 regenerate from registries.yaml at every start."""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from spegel_node.doctor.checks.agent import unit_state
from spegel_node.doctor.facts import Facts
from spegel_node.doctor.model import Check, CheckResult
from spegel_node.doctor.remedy import ENABLE_TIMER, cli_command, restart_command, restart_only
from spegel_node.hostsdir_rules import DEFAULT_DIR
from spegel_node.hoststoml import mirror_key

_EMBEDDED = re.compile(
    r"""^\s*["']?embedded-registry["']?\s*:\s*["']?(true|yes|on)["']?\s*(#.*)?$""",
    re.IGNORECASE | re.MULTILINE,
)
_KEY = re.compile(
    r"""^(\s*)(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|([^\s:#'"][^:#]*?))\s*:(?:\s+(.*?))?\s*$"""
)


def _strip_comment(line: str) -> str:
    out, quote = [], ""
    for ch in line:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            break
        out.append(ch)
    return "".join(out).rstrip()


def _scalar(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def registries_yaml_mirrors(text: str) -> dict[str, list[str]]:
    """`mirrors:` of a k3s registries.yaml: registry name -> endpoint list (a small YAML subset:
    block mappings, block or flow lists, quoted or plain scalars)."""
    mirrors: dict[str, list[str]] = {}
    lines = [_strip_comment(raw) for raw in text.splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    i = 0
    while i < len(lines):
        m = _KEY.match(lines[i])
        i += 1
        if not m or m.group(1) or (m.group(4) or "").strip() != "mirrors":
            continue
        key_indent: int | None = None
        current: str | None = None
        in_endpoint = False
        while i < len(lines):
            line = lines[i]
            indent = len(line) - len(line.lstrip())
            if indent == 0:
                break
            i += 1
            km = _KEY.match(line)
            if key_indent is None:
                key_indent = indent
            if km and indent == key_indent:
                current = km.group(2) or km.group(3) or (km.group(4) or "").strip()
                mirrors[current] = []
                in_endpoint = False
            elif km and current is not None and (km.group(4) or "").strip() == "endpoint":
                value = (km.group(5) or "").strip()
                in_endpoint = not value
                if value.startswith("["):
                    items = value.strip("[]").split(",")
                    mirrors[current] += [_scalar(v) for v in items if v.strip()]
            elif km:
                in_endpoint = False
            elif in_endpoint and current is not None and line.lstrip().startswith("-"):
                mirrors[current].append(_scalar(line.lstrip()[1:]))
    return mirrors


def registries_yaml_rewrites(
    text: str, names: Sequence[str], mirror_urls: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Of `names` (registry hosts, `*` for _default), the ones a k3s/RKE2 registries.yaml
    `text` makes the distro regenerate at every start: (dropping Spegel, naming Spegel first)."""
    mirrors = registries_yaml_mirrors(text)
    wanted = {mirror_key(u) for u in mirror_urls}
    rewritten: list[str] = []
    served: list[str] = []
    for name in names:
        if name not in mirrors:
            continue
        endpoints = [mirror_key(e) for e in mirrors[name]]
        (served if endpoints[:1] and endpoints[0] in wanted else rewritten).append(name)
    return rewritten, served


def registries_yaml_path(distro: str) -> str:
    return f"/etc/rancher/{distro}/registries.yaml"


@dataclass(frozen=True)
class EmbeddedRegistry(Check):
    area: ClassVar[str] = "k3s"
    distro: str  # "k3s" or "rke2"

    @property
    def id(self) -> str:
        return "k3s.embedded_registry"

    def run(self, facts: Facts) -> CheckResult:
        etc = f"/etc/rancher/{self.distro}"
        files = [
            f"{etc}/config.yaml",
            *sorted(
                facts.node.display(p)
                for p in glob.glob(str(facts.node.path(f"{etc}/config.yaml.d/*.yaml")))
            ),
        ]
        enabled_in = []
        for path in files:
            try:
                text = (facts.read_file(path) or b"").decode("utf-8", "replace")
            except OSError:
                continue
            if _EMBEDDED.search(text):
                enabled_in.append(path)
        if not enabled_in:
            return self.passed(f"{self.distro}'s embedded registry (its own Spegel) is off")
        where = ", ".join(enabled_in)
        fix = (
            f"run one Spegel, not two: either remove `embedded-registry: true` from {where} and "
            f"restart ({restart_only(self.distro)}), or keep {self.distro}'s embedded Spegel "
            f"and uninstall the Spegel chart and spegel-node (`{cli_command(facts, 'remove')}`)"
        )
        if facts.mirror_v2.status == 200:
            return self.fail(
                f"{self.distro} embeds Spegel (embedded-registry: true in {where}) and the Spegel "
                f"DaemonSet answers on {facts.mirror_url} too: two registries advertise this "
                "node's content and both configure its mirrors",
                fix,
            )
        return self.warn(
            f"{self.distro} embeds Spegel (embedded-registry: true in {where}): the Spegel "
            "DaemonSet and spegel-node are not needed on this node",
            fix,
        )


@dataclass(frozen=True)
class RegistriesYaml(Check):
    area: ClassVar[str] = "k3s"
    distro: str

    @property
    def id(self) -> str:
        return "k3s.registries_yaml"

    def run(self, facts: Facts) -> CheckResult:
        path = registries_yaml_path(self.distro)
        try:
            raw = facts.read_file(path)
        except OSError as e:
            return self.warn(f"cannot read {path}: {e.strerror or e}", "run doctor as root")
        if raw is None:
            return self.passed(f"no {path}: {self.distro} leaves the hosts dir alone")
        text = raw.decode("utf-8", "replace")
        mirrors = registries_yaml_mirrors(text)
        wanted = {mirror_key(u) for u in facts.mirror_urls}
        targets = ["*" if t.name == DEFAULT_DIR else t.name for t in facts.hosts_targets()]
        rewritten, served = registries_yaml_rewrites(text, targets, facts.mirror_urls)
        if not rewritten:
            if served:
                return self.passed(
                    f"{path} names Spegel first for {', '.join(served)}: {self.distro} writes it"
                )
            return self.passed(f"{path} names no mirrored registry")
        names = ", ".join(rewritten)
        default_note = (
            f" ({self.distro} turns '*' into {DEFAULT_DIR}/, Spegel #813)"
            if "*" in rewritten
            else ""
        )
        summary = (
            f"{self.distro} regenerates the hosts.toml of {names} from {path} at every start, "
            f"dropping the Spegel mirror{default_note}"
        )
        if unit_state(facts).all_enabled:
            return self.passed(f"{summary}; the repair path unit puts it back within seconds")
        lines = ["mirrors:"]
        for name in rewritten:
            lines += [f'  "{name}":', "    endpoint:"]
            lines += [f'      - "{u}"' for u in facts.mirror_urls]
            lines += [f'      - "{e}"' for e in mirrors[name] if mirror_key(e) not in wanted]
        return self.warn(
            summary,
            f"name Spegel first in {path}, so {self.distro} writes it itself:\n"
            + "\n".join(lines)
            + f"\nthen: {restart_command(self.distro)}\nor enable the repair units: {ENABLE_TIMER}",
        )

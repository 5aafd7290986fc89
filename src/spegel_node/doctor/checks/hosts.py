"""hosts.<registry> and hosts.shadowing: the hosts.toml containerd will actually read for each
mirrored registry (lookup rules, every config_path root in order), checked with containerd's own
parser rules, listing the Spegel mirror first."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from spegel_node.compat import zip_strict
from spegel_node.doctor.checks import no_layout
from spegel_node.doctor.facts import Facts, HostsTarget
from spegel_node.doctor.model import Check, CheckResult, Status
from spegel_node.doctor.remedy import apply_command, cli_command, gate_fix, mirrors_fix
from spegel_node.hostsdir_rules import DEFAULT_DIR
from spegel_node.hoststoml import mirror_key
from spegel_node.redact import redact_url
from spegel_node.registry import registry_for_host
from spegel_node.validate import (
    DIAL_TIMEOUT_SINCE,
    ERROR,
    Finding,
    parse_and_validate,
    validate_hosts_dir,
)


def finding_line(f: Finding) -> str:
    where = f"{f.path}:{f.line}" if f.line else f.path
    return f"{where}: {f.severity} {f.code}: {f.message}"


def gate_note(facts: Facts) -> str:
    record = facts.record
    if record is None:
        return ""
    g = record.gate
    last = f" (last: {g.last_error})" if g.last_error else ""
    return (
        f"the health gate withdrew Spegel after {g.consecutive_failures} failed /v2/ probes{last}"
    )


GATE_FIX = (
    "make Spegel answer again (see spegel.v2); the next `spegel-node apply` (the repair timer "
    "runs it) puts the mirror back as soon as /v2/ answers"
)


OLD_CONTAINERD_FIX = (
    "containerd before 2.0.7 ignores dial_timeout: while Spegel is down each layer waits for "
    "the 30 s default dial until the health gate withdraws the mirror; keep the repair timer on "
    "(agent.timer) and upgrade containerd to 2.0.7+ to have dial_timeout honoured"
)
VALIDATE_FIX = "`spegel-node validate {path}` explains each warning"


@dataclass(frozen=True)
class HostsRegistry(Check):
    area: ClassVar[str] = "hosts"
    local: ClassVar[bool] = True
    target: HostsTarget

    @property
    def id(self) -> str:
        return f"hosts.{self.target.name}"

    def run(self, facts: Facts) -> CheckResult:
        if facts.layout is None:
            return no_layout(self)
        label = self.target.label
        roots = facts.hosts_roots
        found = facts.lookup(self.target)
        fix = mirrors_fix(facts)
        if found is None:
            where = ", ".join(roots.roots)
            if facts.gate_withdrawn:
                return self.warn(
                    f"no hosts.toml for {label} in {where}: {gate_note(facts)}", gate_fix(facts)
                )
            return self.fail(
                f"no directory for {label} in {where}: containerd pulls it straight from upstream",
                fix,
            )
        host_dir = facts.path(found.dir)
        if not host_dir.is_dir():
            return self.fail(
                f"{found.dir} is not a directory, yet containerd looks it up for {label}",
                f"move {found.dir} aside, then {fix}",
            )
        try:
            data = facts.read_path(host_dir / "hosts.toml")
        except OSError as e:
            return self.fail(f"cannot read {found.hosts_toml}: {e.strerror or e}", fix)
        if data is None:
            hides = found.name != DEFAULT_DIR and os.path.lexists(
                facts.node.path(found.root) / DEFAULT_DIR
            )
            return self.fail(
                f"{found.dir}/ has no hosts.toml: containerd reads this directory for {label} and "
                "pulls upstream" + (f", never looking at {DEFAULT_DIR}/" if hides else ""),
                fix,
            )
        return self._check_file(facts, found.hosts_toml, host_dir, data)

    def _check_file(self, facts: Facts, path: str, host_dir: Any, data: bytes) -> CheckResult:
        label = self.target.label
        version = facts.containerd_version.version
        doc, findings = parse_and_validate(
            data,
            display_path=path,
            file_dir=host_dir,
            containerd_version=version,
            root=facts.node.root,
        )
        details = [finding_line(f) for f in findings]
        errors = [f for f in findings if f.severity == ERROR]
        if errors:
            first = errors[0]
            at = f" (line {first.line})" if first.line else ""
            return self.fail(
                f"{path} is dropped by containerd: {first.code}{at}: {first.message}",
                f"containerd ignores the whole file and pulls {label} straight from upstream. "
                f"Fix it (`{cli_command(facts, f'validate {path}')}` lists every problem), then run "
                f"`{apply_command(facts)}`",
                details,
            )
        doc = doc or {}  # no error finding: it parsed
        hosts = doc.get("host") if isinstance(doc.get("host"), dict) else {}
        assert isinstance(hosts, dict)
        urls = list(hosts)
        wanted = {mirror_key(u) for u in facts.mirror_urls}
        position = next((i for i, u in enumerate(urls) if mirror_key(u) in wanted), None)
        fix = mirrors_fix(facts)
        if position is None:
            if facts.gate_withdrawn:
                return self.warn(
                    f"{path} does not list Spegel: {gate_note(facts)}", gate_fix(facts), details
                )
            listed = ", ".join(redact_url(u) for u in urls) or "no mirror"
            return self.fail(
                f"{path} does not list the Spegel mirror {facts.mirror_url} (it lists {listed}): "
                f"containerd never asks Spegel for {label}",
                fix,
                details,
            )
        if position > 0:
            return self.fail(
                f"{path} lists {redact_url(urls[0])} before Spegel: containerd asks it first",
                fix,
                details,
            )
        return self._check_spegel_host(facts, path, hosts[urls[0]], findings, details)

    def _check_spegel_host(
        self,
        facts: Facts,
        path: str,
        table: Any,
        findings: Sequence[Finding],
        details: list[str],
    ) -> CheckResult:
        table = table if isinstance(table, dict) else {}
        caps_raw = table.get("capabilities")
        caps = [str(c).lower() for c in caps_raw] if isinstance(caps_raw, list) else None
        shown = ", ".join(caps) if caps is not None else "all capabilities"
        fix = mirrors_fix(facts)
        if caps is not None and "pull" not in caps:
            return self.fail(
                f"{path} lists Spegel first without the pull capability: containerd fetches "
                "nothing from it",
                fix,
                details,
            )
        problems: list[tuple[str, str]] = []  # (what, how to fix it)
        if caps is None:
            problems.append(
                ("Spegel's host has no capabilities list (containerd reads: push too)", fix)
            )
        elif facts.settings.resolve_tags and "resolve" not in caps:
            problems.append(("Spegel's host lacks resolve, so tags are resolved upstream", fix))
        version = facts.containerd_version
        if "dial_timeout" not in table and version.at_least(DIAL_TIMEOUT_SINCE) is not False:
            problems.append(
                (
                    "no dial_timeout on Spegel's host: a dead mirror costs containerd's 30 s "
                    "default dial per layer",
                    fix,
                )
            )
        for f in findings:
            how = (
                OLD_CONTAINERD_FIX
                if f.code == "dial_timeout.ignored"
                else f"`{cli_command(facts, f'validate {path}')}` explains each warning"
            )
            problems.append((f"{f.code}: {f.message}", how))
        if facts.hosts_roots.read_by_containerd is False:
            problems.insert(
                0,
                (
                    "containerd does not read this dir (see containerd.config_path)",
                    "see containerd.config_path",
                ),
            )
        if problems:
            fixes = "\n".join(dict.fromkeys(how for _, how in problems))
            summary = f"{path} lists Spegel first ({shown}), but: {problems[0][0]}"
            found = {f"{f.code}: {f.message}" for f in findings}
            more = [what for what, _ in problems[1:] if what not in found]
            lines = [line for f, line in zip_strict(findings, details) if f.message not in summary]
            return self.result(Status.WARN, summary, fixes, [*more, *lines])
        return self.passed(f"{path} lists Spegel first ({shown})", details)


@dataclass(frozen=True)
class HostsShadowing(Check):
    area: ClassVar[str] = "hosts"

    @property
    def id(self) -> str:
        return "hosts.shadowing"

    def run(self, facts: Facts) -> CheckResult:
        if facts.layout is None:
            return no_layout(self)
        roots = [r for r in facts.hosts_roots.roots if facts.node.path(r).is_dir()]
        findings: list[Finding] = []
        for root in roots:
            findings += [
                f
                for f in validate_hosts_dir(
                    facts.node.path(root), display=facts.node.display, files=False
                )
                if f.code in ("dir.shadowed", "dir.hides_default")
            ]
        lines = [f"{f.path}: {f.message}" for f in findings]
        lines += _across_roots(facts, roots)
        if not lines:
            where = ", ".join(roots) or "no hosts dir yet"
            return self.passed(f"no directory hides another ({where})")
        fixes = []
        if any(f.code == "dir.hides_default" for f in findings):
            fixes.append(
                "an empty registry dir hides _default/: remove it (rmdir DIR) or run "
                f"`{apply_command(facts)}`, which writes the Spegel mirror into it"
            )
        if any(f.code == "dir.shadowed" for f in findings):
            fixes.append(
                "containerd reads host_port_/ before host:port/: merge host:port/hosts.toml into "
                "host_port_/ and remove host:port/"
            )
        if len(lines) > len(findings):
            fixes.append(
                "containerd searches each config_path root fully (with its _default/) before the "
                "next: move the later root's registry dirs into the first root"
            )
        default_mode = facts.settings.default_mode
        hides_default = any(f.code == "dir.hides_default" for f in findings)
        status = Status.FAIL if default_mode and hides_default else Status.WARN
        consequence = (
            ": those registries bypass _default and Spegel" if status is Status.FAIL else ""
        )
        return self.result(
            status,
            f"{len(lines)} director{'y is' if len(lines) == 1 else 'ies are'} hidden or hide "
            f"another{consequence}",
            "\n".join(fixes),
            lines,
        )


def _across_roots(facts: Facts, roots: Sequence[str]) -> list[str]:
    """Dirs in a later config_path root that an earlier root hides."""
    names = {r: set(_listdir(facts, r)) for r in roots}
    lines: list[str] = []
    for i, first in enumerate(roots):
        for later in roots[i + 1 :]:
            for name in sorted(names[later]):
                if name.startswith(".") or name == "_backup":
                    continue
                if DEFAULT_DIR in names[first]:
                    lines.append(f"{later}/{name}: hidden by {first}/{DEFAULT_DIR}/")
                    continue
                if name == DEFAULT_DIR:
                    continue
                hit = [d for d in registry_for_host(name).dir_names if d in names[first]]
                if hit:
                    lines.append(f"{later}/{name}: hidden by {first}/{hit[0]}/")
    return lines


def _listdir(facts: Facts, root: str) -> list[str]:
    try:
        return os.listdir(facts.node.path(root))
    except OSError:
        return []

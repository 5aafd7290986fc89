"""hosts.stale: Spegel mirror tables the config no longer asks for, in spegel-node's hosts dir.

A registry dropped from `registries` keeps its Spegel table until apply gives the file back,
outside the health gate (a dead Spegel is never withdrawn there); an old mirror URL (a changed
`host_port` or `node_ip`, as the state record lists the URLs of the last apply) points containerd
at a mirror that is no longer there, before every pull.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import ClassVar

from spegel_node.doctor.checks import no_layout
from spegel_node.doctor.facts import Facts
from spegel_node.doctor.model import Check, CheckResult, Status
from spegel_node.doctor.remedy import apply_command
from spegel_node.flavors import flavor as flavor_record
from spegel_node.hoststoml import HostsTomlError, host_urls, mirror_key, redact_url
from spegel_node.plan import HOSTS_TOML, DirEntry, HostsSnapshot, targets
from spegel_node.registry import DEFAULT_DIR

MAX_DETAILS = 50


@dataclass(frozen=True)
class _Stale:
    path: str
    url: str
    retired: bool  # an old mirror URL (else: a registry no longer in the config)
    by_apply: bool  # apply takes it out (a file on record, or an old URL in a managed file)


@dataclass(frozen=True)
class HostsStale(Check):
    area: ClassVar[str] = "hosts"

    @property
    def id(self) -> str:
        return "hosts.stale"

    def run(self, facts: Facts) -> CheckResult:
        if facts.layout is None:
            return no_layout(self)
        if flavor_record(facts.flavor).distro_owned:
            return self.skip(f"spegel-node does not write hosts files on {facts.flavor}")
        hosts_dir = facts.hosts_dir
        names = facts.root_names(hosts_dir)
        if not names:
            return self.passed(f"no Spegel table left behind ({hosts_dir} is empty or absent)")
        record = facts.record
        current = {mirror_key(u) for u in facts.mirror_urls}
        old = {mirror_key(u) for u in (record.mirror_urls if record else ())} - current
        recorded = set(record.files) if record else set()
        snapshot = HostsSnapshot(hosts_dir, True, {n: DirEntry(n, "dir") for n in names})
        wanted = {t.dir_name for t in targets(facts.settings.registries, snapshot)}
        base = facts.real_dir(hosts_dir)
        found: list[_Stale] = []
        for name in sorted(names):
            if name.startswith(".") or (name.startswith("_") and name != DEFAULT_DIR):
                continue  # _backup: Spegel's init container's, not read by containerd
            path = posixpath.join(hosts_dir, name, HOSTS_TOML)
            try:
                data = facts.read_path(base / name / HOSTS_TOML, path)
                urls = host_urls(data.decode("utf-8", "replace")) if data else []
            except (OSError, HostsTomlError):
                continue  # hosts.<registry> and validate report those
            key = f"{name}/{HOSTS_TOML}"
            on_record = key in recorded
            for url in urls:
                norm = mirror_key(url)
                if norm in old:
                    found.append(_Stale(path, url, True, on_record or name in wanted))
                elif norm in current and name not in wanted:
                    if name == DEFAULT_DIR and not on_record:
                        continue  # a person's own choice: every registry through Spegel
                    found.append(_Stale(path, url, False, on_record))
        if not found:
            return self.passed(f"no Spegel table left behind in {hosts_dir}")
        return self._report(facts, found)

    def _report(self, facts: Facts, found: list[_Stale]) -> CheckResult:
        apply = apply_command(facts)
        lines = [
            f'{s.path}: [host."{redact_url(s.url)}"] '
            + (
                "is an old Spegel mirror URL"
                if s.retired
                else "is Spegel's, for a registry no longer in `registries`"
            )
            for s in found
        ]
        retired = [s for s in found if s.retired]
        first = retired[0] if retired else found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        if first.retired:
            summary = (
                f"{first.path} still lists the old Spegel mirror {redact_url(first.url)}: "
                f"containerd tries it before every pull{more}"
            )
        else:
            summary = (
                f"{first.path} still lists Spegel for a registry no longer in `registries`, "
                f"outside the health gate{more}"
            )
        fixes = []
        if any(s.by_apply for s in found):
            fixes.append(
                f"run `{apply}`: it takes the old tables out and gives back the files of "
                "registries no longer mirrored"
            )
        manual = sorted({s.path for s in found if not s.by_apply})
        if manual:
            fixes.append(
                "spegel-node's record does not list "
                + (manual[0] if len(manual) == 1 else f"{len(manual)} of these files")
                + ': delete the Spegel [host."..."] table there by hand, or add the registry '
                f"to `registries` in /etc/spegel-node/config.toml and run `{apply}`"
            )
        status = Status.FAIL if retired else Status.WARN
        shown = lines[:MAX_DETAILS]
        if len(lines) > MAX_DETAILS:
            shown.append(f"{len(lines) - MAX_DETAILS} more not shown")
        return self.result(status, summary, "\n".join(fixes), shown)

"""agent.*: what spegel-node itself left on the node: drift since the last apply, the health
gate, and the systemd units that repair the hosts dir."""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from typing import ClassVar

from spegel_node.compat import zip_strict
from spegel_node.doctor.facts import Facts
from spegel_node.doctor.model import Check, CheckResult
from spegel_node.doctor.remedy import (
    ENABLE_TIMER,
    TIMER_UNITS,
    apply_command,
    cli_command,
    gate_fix,
    install_units_command,
)
from spegel_node.flavors import flavor as flavor_record
from spegel_node.hostsdir_rules import DEFAULT_DIR
from spegel_node.hoststoml import HostsTomlError, host_urls, mirror_key
from spegel_node.node import STATE_DIR

UNIT_DIRS = (
    "/etc/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
)


EDITED = "changed since the last apply (by k3s, a person or another tool)"
REBASE_NOTE = (
    ": it keeps that version (minus the Spegel tables) as the one `spegel-node remove` gives "
    "back, and puts the mirror first again. To drop the change instead, undo it by hand first "
    "(`spegel-node apply --dry-run` shows the diff)"
)


@dataclass(frozen=True)
class UnitState:
    installed: tuple[str, ...]
    enabled: tuple[str, ...]

    @property
    def all_enabled(self) -> bool:
        return set(self.enabled) == set(TIMER_UNITS)


def unit_state(facts: Facts) -> UnitState:
    """Which repair units are installed and enabled (a `*.wants/` link) under the root."""
    installed, enabled = [], []
    for unit in TIMER_UNITS:
        if any(os.path.lexists(facts.node.path(f"{d}/{unit}")) for d in UNIT_DIRS):
            installed.append(unit)
        wants = [
            *glob.glob(str(facts.node.path(f"/etc/systemd/system/*.wants/{unit}"))),
            *glob.glob(str(facts.node.path(f"/usr/lib/systemd/system/*.wants/{unit}"))),
        ]
        if wants:
            enabled.append(unit)
    return UnitState(tuple(installed), tuple(enabled))


@dataclass(frozen=True)
class AgentDrift(Check):
    area: ClassVar[str] = "agent"

    @property
    def id(self) -> str:
        return "agent.drift"

    def run(self, facts: Facts) -> CheckResult:
        if flavor_record(facts.flavor).distro_owned:
            return self.skip(f"spegel-node does not write hosts files on {facts.flavor}")
        apply = apply_command(facts)
        if facts.record_error:
            return self.fail(
                f"cannot read the state record: {facts.record_error}",
                f"move {STATE_DIR}/state.json aside and run `{apply}` (remove can then no longer "
                "restore the original files)",
            )
        record = facts.record
        if record is None or not record.files:
            return self.warn(
                f"spegel-node apply has not run on this node (no state record in {STATE_DIR})",
                f"run `{apply}`",
            )
        hosts_dir = facts.hosts_dir
        if record.hosts_dir and record.hosts_dir != hosts_dir:
            return self.warn(
                f"the last apply wrote under {record.hosts_dir}, but the hosts dir is now {hosts_dir}",
                f"{cli_command(facts, f'remove --hosts-dir {record.hosts_dir}')} && {apply}",
            )
        wanted = {mirror_key(u) for u in facts.mirror_urls}
        withdrawn = record.gate.withdrawn
        broken: list[str] = []
        changed: list[str] = []
        for key, rec in sorted(record.files.items()):
            path = f"{record.hosts_dir}/{key}"
            try:
                data = facts.read_file(path)
            except OSError as e:
                broken.append(f"{path}: cannot read ({e.strerror or e})")
                continue
            if data is None:
                broken.append(f"{path}: gone since the last apply")
                continue
            if rec.holds_last_write(data):  # or the write before, of a run killed midway
                continue
            try:
                urls = host_urls(data.decode("utf-8", "replace"))
            except HostsTomlError as e:
                broken.append(f"{path}: rewritten since the last apply, now unparseable ({e})")
                continue
            if not withdrawn and not any(mirror_key(u) in wanted for u in urls):
                broken.append(f"{path}: rewritten since the last apply, without the Spegel mirror")
            else:
                changed.append(f"{path}: {EDITED}")
        applied = {k.split("/", 1)[0] for k in record.files}
        for target in [] if withdrawn else facts.hosts_targets():
            names = [n for n in target.dir_names if n != DEFAULT_DIR] or [DEFAULT_DIR]
            if not applied.intersection(names):
                changed.append(f"{target.label}: not applied yet (new in the config?)")
        if tuple(record.mirror_urls) != facts.mirror_urls:
            changed.append(
                f"mirror URLs changed since the last apply: {', '.join(record.mirror_urls)} -> "
                f"{', '.join(facts.mirror_urls)}"
            )
        if broken:
            return self.fail(
                f"{broken[0]}" + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""),
                f"run `{apply}`; if this keeps happening, enable the repair units (agent.timer)",
                [*broken, *changed],
            )
        if changed:
            edited = any(line.endswith(EDITED) for line in changed)
            return self.warn(
                changed[0] + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""),
                f"run `{apply}`" + (REBASE_NOTE if edited else ""),
                changed,
            )
        n = len(record.files)
        return self.passed(f"{n} file{'s' if n != 1 else ''} as the last apply left them")


@dataclass(frozen=True)
class AgentGate(Check):
    area: ClassVar[str] = "agent"

    @property
    def id(self) -> str:
        return "agent.gate"

    def run(self, facts: Facts) -> CheckResult:
        if flavor_record(facts.flavor).distro_owned:
            return self.skip(f"spegel-node does not write hosts files on {facts.flavor}")
        record = facts.record
        if record is None:
            return self.skip("no gate state yet (spegel-node apply has not run)")
        g = record.gate
        threshold = facts.settings.gate_failures
        last = f" (last: {g.last_error})" if g.last_error else ""
        if g.withdrawn:
            since = f" since {_when(g.last_change_at)}" if g.last_change_at else ""
            return self.warn(
                f"the health gate has withdrawn Spegel from hosts.toml{since}, after "
                f"{g.consecutive_failures} failed /v2/ probes{last}: pulls go upstream",
                gate_fix(facts),
            )
        if g.consecutive_failures:
            return self.warn(
                f"{g.consecutive_failures} of {threshold} /v2/ probes in a row failed{last}; at "
                f"{threshold} the mirror is withdrawn",
                "see spegel.v2",
            )
        if g.last_probe_at is None:
            return self.passed("Spegel advertised (no probe recorded: apply ran with --no-gate)")
        ago = max(0.0, facts.now() - g.last_probe_at)
        return self.passed(f"Spegel advertised; the last /v2/ probe succeeded {ago:.0f} s ago")


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))


@dataclass(frozen=True)
class AgentTimer(Check):
    area: ClassVar[str] = "agent"

    @property
    def id(self) -> str:
        return "agent.timer"

    def run(self, facts: Facts) -> CheckResult:
        if flavor_record(facts.flavor).distro_owned:
            return self.skip(f"the agent does not run on {facts.flavor} (no systemd units)")
        units = unit_state(facts)
        why = (
            "nothing re-applies the mirror after k3s, RKE2 or a person rewrites the hosts dir "
            "(ignore this if spegel-node runs as a DaemonSet instead)"
        )
        if not units.installed:
            return self.warn(
                f"the repair units ({', '.join(TIMER_UNITS)}) are not installed: {why}",
                f"{install_units_command(facts)} && {ENABLE_TIMER}\n(the Ansible role does the same)",
            )
        if not units.all_enabled:
            missing = [u for u in TIMER_UNITS if u not in units.enabled]
            return self.warn(f"{', '.join(missing)} installed but not enabled: {why}", ENABLE_TIMER)
        if facts.live and facts.node.path("/run/systemd/system").is_dir():
            done = facts.run(["systemctl", "is-active", *TIMER_UNITS])
            states = done.stdout.split()
            if done.returncode is not None and len(states) == len(TIMER_UNITS):
                inactive = [u for u, s in zip_strict(TIMER_UNITS, states) if s != "active"]
                if inactive:
                    return self.warn(
                        f"{', '.join(inactive)} enabled but not active: {why}", ENABLE_TIMER
                    )
                return self.passed(f"{' and '.join(TIMER_UNITS)} enabled and active")
        return self.passed(f"{' and '.join(TIMER_UNITS)} enabled")

"""What each command shows: text (table or plain) and JSON, from the flow's dataclasses."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from spegel_node.apply import Outcome
from spegel_node.layout import Layout
from spegel_node.output import print_json, print_lines, print_table
from spegel_node.validate import Finding
from spegel_node.validate_paths import Rules


def _cell(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def layout_report(layout: Layout, output: str) -> None:
    data = layout.to_json()
    if output == "json":
        print_json(data)
        return
    rows = [[key, _cell(value)] for key, value in data.items() if key not in ("evidence", "config")]
    config = data.get("config")
    if isinstance(config, dict):
        rows += [[f"config.{key}", _cell(value)] for key, value in config.items() if key != "path"]
    rows += [["evidence", line] for line in layout.evidence]
    print_table(f"node layout: {layout.flavor}", ["key", "value"], rows)


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    plan = outcome.plan
    data: dict[str, Any] = {
        "ok": outcome.exit_code == 0,
        "command": outcome.command,
        "dry_run": outcome.dry_run,
        "hosts_dir": plan.hosts_dir,
        "mirrors": list(outcome.mirror_urls),
        "changes": [
            {
                "path": f"{plan.hosts_dir}/{c.key}",
                "action": c.action,
                "diff": c.diff(plan.hosts_dir),
            }
            for c in plan.changes
        ],
        "problems": list(plan.problems),
        "warnings": list(outcome.warnings),
    }
    if outcome.gate is not None:
        data["gate"] = {
            "withdrawn": outcome.gate.withdrawn,
            "consecutive_failures": outcome.gate.consecutive_failures,
            "probe": None
            if outcome.probe is None
            else {"ok": outcome.probe.ok, "detail": outcome.probe.detail},
        }
    return data


def outcome_report(outcome: Outcome, output: str) -> None:
    if output == "json":
        print_json(outcome_json(outcome))
        return
    plan = outcome.plan
    lines: list[str] = []
    if outcome.probe is not None and outcome.gate is not None:
        state = "withdrawn" if outcome.gate.withdrawn else "advertised"
        lines.append(
            f"gate: {outcome.mirror_urls[0]}/v2/ -> {outcome.probe.detail}; mirror {state}"
            + (
                f" ({outcome.gate.consecutive_failures} failures in a row)"
                if not outcome.probe.ok
                else ""
            )
        )
    verb = "would " if outcome.dry_run else ""
    for change in plan.changes:
        lines.append(f"{verb}{change.action} {plan.hosts_dir}/{change.key}")
    print_lines(lines)
    if outcome.dry_run:
        for change in plan.changes:
            sys.stdout.write(change.diff(plan.hosts_dir))
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in plan.problems:
        print(f"error: {problem}", file=sys.stderr)
    n = len(plan.changes)
    summary = f"{n} file{'s' if n != 1 else ''} {'to change' if outcome.dry_run else 'changed'}"
    print(summary if n else "nothing to change")


def findings_report(
    findings: Sequence[Finding],
    files: int,
    output: str,
    strict: bool,
    rules: Rules | None = None,
) -> None:
    """`rules`: whose containerd rules were applied (JSON `rules`, a last text line)."""
    errors = [f for f in findings if f.severity == "error" or strict]
    if output == "json":
        print_json(
            {
                "ok": not errors,
                "files": files,
                **({"rules": rules.to_json()} if rules is not None else {}),
                "findings": [
                    {
                        "path": f.path,
                        "line": f.line,
                        "severity": f.severity,
                        "code": f.code,
                        "message": f.message,
                    }
                    for f in findings
                ],
            }
        )
        return
    rows = [
        [f.severity, f"{f.path}:{f.line}" if f.line else f.path, f.code, f.message]
        for f in findings
    ]
    if rows:
        print_table(None, ["severity", "where", "code", "message"], rows, status_column=0)
    n_err = sum(1 for f in findings if f.severity == "error")
    n_warn = len(findings) - n_err
    print(f"{files} file{'s' if files != 1 else ''} checked: {n_err} error(s), {n_warn} warning(s)")
    if rules is not None:
        print(f"rules: {rules.label} ({rules.source})")

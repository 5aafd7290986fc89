"""doctor's output: a rich table grouped by area on a terminal, plain lines in a pipe, JSON.

Plain lines:
    [✓] spegel.v2  http://10.0.0.5:29999/v2/ answered HTTP 200 in 2 ms
    [✗] containerd.config_path  config_path is not set ...
        add to /etc/containerd/config.toml ...
    [✗] spegel.readyz (ignored)  ...
    2 checks failed, 1 warning, 1 ignored (17 checks in 0.41 s)

An ignored check (`--ignore`) keeps its status and is shown, marked, but is not counted.
"""

from __future__ import annotations

from typing import Any, TextIO

from spegel_node.doctor.model import AREAS, CheckResult, Status
from spegel_node.doctor.runner import Run
from spegel_node.output import STATUS_STYLES, STATUS_SYMBOLS, indent, print_json, wants_rich


def summary_line(run: Run) -> str:
    failed, warned = run.count(Status.FAIL), run.count(Status.WARN)
    total = len(run.results)
    tail = f"({total} checks in {run.duration_s:.2f} s)"
    ignored = f", {run.ignored} ignored" if run.ignored else ""
    if not failed and not warned:
        return f"no issues found{ignored} {tail}"
    parts = []
    if failed:
        parts.append(f"{failed} check{'s' if failed != 1 else ''} failed")
    if warned:
        parts.append(f"{warned} warning{'s' if warned != 1 else ''}")
    return f"{', '.join(parts)}{ignored} {tail}"


def label(r: CheckResult) -> str:
    """The check's id as shown: `spegel.v2 (ignored)` when --ignore matched it."""
    return f"{r.id} (ignored)" if r.ignored else r.id


def to_json(run: Run, flavor: str | None, mirror_url: str) -> dict[str, Any]:
    return {
        "ok": run.ok,
        "flavor": flavor,
        "duration_s": run.duration_s,
        "checks": [r.to_json() for r in run.results],
        "mirror_url": mirror_url,
        "summary": summary_line(run),
    }


def print_report(
    run: Run, flavor: str | None, mirror_url: str, output: str, stream: TextIO
) -> None:
    if output == "json":
        print_json(to_json(run, flavor, mirror_url), stream)
        return
    title = f"spegel-node doctor: {flavor or 'unknown'} node, mirror {mirror_url}"
    if wants_rich(stream):
        _rich(run, title, stream)
    else:
        _plain(run, title, stream)


def _plain(run: Run, title: str, out: TextIO) -> None:
    out.write(title + "\n")
    for r in run.results:
        out.write(f"[{STATUS_SYMBOLS[r.status.value]}] {label(r)}  {r.summary}\n")
        if r.status is Status.PASS:
            continue
        for line in r.details:
            out.write(f"      {line}\n")
        for line in r.remediation.splitlines():
            out.write(f"    {line}\n")
    out.write(summary_line(run) + "\n")


def _rich(run: Run, title: str, out: TextIO) -> None:
    """The table holds status, id and summary; the fixes follow it unwrapped, so that config
    snippets and commands can be copied as they are."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", show_header=True, expand=False)
    table.add_column("", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("result", overflow="fold")
    order = {area: i for i, area in enumerate(AREAS)}
    areas = sorted({r.area for r in run.results}, key=lambda a: order.get(a, len(order)))
    for n, area in enumerate(areas):
        if n:
            table.add_section()
        for r in (r for r in run.results if r.area == area):
            table.add_row(*_cells(r, Text))
    console = Console(file=out, highlight=False)
    console.print(table)
    for r in run.results:
        if r.status is Status.PASS or not r.remediation:
            continue
        style = STATUS_STYLES[r.status.value]
        console.print(Text(f"\n{STATUS_SYMBOLS[r.status.value]} {label(r)}", style=f"bold {style}"))
        console.print(Text(indent(r.remediation, "    ")), soft_wrap=True)
    style = "red" if not run.ok else ("yellow" if run.count(Status.WARN) else "green")
    console.print(Text("\n" + summary_line(run), style=style))


def _cells(r: CheckResult, text: Any) -> tuple[Any, Any, Any]:
    style = STATUS_STYLES[r.status.value]
    symbol = text(STATUS_SYMBOLS[r.status.value], style=f"bold {style}")
    body = text(r.summary)
    if r.status is not Status.PASS:
        for line in r.details:
            body.append("\n" + line, style="dim")
    return symbol, text(label(r), style="dim" if r.ignored else ""), body

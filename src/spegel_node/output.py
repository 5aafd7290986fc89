"""Rendering for operators and machines: a rich table on a terminal, plain lines in a pipe, JSON.

rich is imported only when stdout is a terminal (start-up time matters on every node).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

STATUS_SYMBOLS = {"pass": "✓", "warn": "!", "fail": "✗", "skip": "-", "error": "✗", "warning": "!"}
STATUS_STYLES = {
    "pass": "green",
    "warn": "yellow",
    "fail": "red",
    "skip": "dim",
    "error": "red",
    "warning": "yellow",
}


def wants_rich(stream: TextIO) -> bool:
    return stream.isatty() and os.environ.get("TERM") != "dumb"


SCHEMA = "spegel-node/v1"


def print_json(data: Any, stream: TextIO | None = None) -> None:
    """Every JSON object spegel-node prints leads with `"schema": SCHEMA` (docs/json.md)."""
    out = stream or sys.stdout
    if isinstance(data, dict) and "schema" not in data:
        data = {"schema": SCHEMA, **data}
    out.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def print_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    stream: TextIO | None = None,
    status_column: int | None = None,
) -> None:
    """Rows as a rich table on a terminal, else as aligned plain lines (no colour, no box)."""
    out = stream or sys.stdout
    if wants_rich(out):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left", show_lines=False)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            cells = list(row)
            if status_column is not None:
                status = cells[status_column]
                style = STATUS_STYLES.get(status, "")
                cells[status_column] = f"[{style}]{STATUS_SYMBOLS.get(status, '')} {status}[/]"
            table.add_row(*cells)
        Console(file=out, highlight=False).print(table)
        return
    if title:
        out.write(f"{title}\n")
    widths = [
        max([len(c)] + [len(r[i]) for r in rows if i < len(r)]) for i, c in enumerate(columns)
    ]
    for row in rows:
        cells = (
            [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]] if row else []
        )
        out.write("  ".join(cells).rstrip() + "\n")


def print_lines(lines: Sequence[str], stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    for line in lines:
        out.write(line + "\n")


def indent(text: str, by: str = "  ") -> str:
    """`text` with each non-empty line indented `by`, trailing newlines dropped."""
    return "\n".join(by + line if line else line for line in text.rstrip("\n").split("\n"))

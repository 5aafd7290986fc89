"""Header values in hosts.toml carry credentials: find them so no output ever shows them."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from typing import Any

REDACTED = "<redacted>"
_HEADER_SECTION = re.compile(r"^\s*\[.*header.*\]\s*$", re.IGNORECASE)
_SECTION = re.compile(r"^\s*\[")
_ASSIGNMENT = re.compile(r"^(\s*[^=#]+=\s*)(.+)$")
_INLINE_HEADER = re.compile(r"^(\s*header\s*=\s*)(.+)$", re.IGNORECASE)


def _header_values(table: Any) -> Iterable[str]:
    if isinstance(table, dict):
        for key, value in table.items():
            if key == "header" and isinstance(value, dict):
                for v in value.values():
                    items = v if isinstance(v, list) else [v]
                    yield from (str(i) for i in items)
            else:
                yield from _header_values(value)


def redact_hosts_toml(text: str) -> str:
    """The text with every header value replaced by <redacted>, parseable or not."""
    try:
        secrets = {s for s in _header_values(tomllib.loads(text)) if s}
    except (tomllib.TOMLDecodeError, RecursionError):
        return _redact_lines(text)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _redact_lines(text)  # also catches values split across lines or escaped


def _redact_lines(text: str) -> str:
    out: list[str] = []
    in_header = False
    for line in text.splitlines(keepends=True):
        if _SECTION.match(line):
            in_header = bool(_HEADER_SECTION.match(line))
        elif (in_header and (m := _ASSIGNMENT.match(line))) or (m := _INLINE_HEADER.match(line)):
            eol = "\n" if line.endswith("\n") else ""
            line = f"{m.group(1)}{REDACTED if not in_header else _quote(REDACTED)}{eol}"
        out.append(line)
    return "".join(out)


def _quote(s: str) -> str:
    return f'"{s}"'

"""Credentials in TOML the agent shows (hosts.toml headers; containerd's registry `auth`,
`headers`, passwords and tokens): find them so no output ever shows them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from spegel_node.compat import tomllib
from spegel_node.hoststoml import redact_text
from spegel_node.tomlload import too_complex

REDACTED = "<redacted>"
_SECTION = re.compile(r"^\s*\[")
_KEY = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY_LIKE = re.compile(rf"^\s*{_KEY}(?:\s*\.\s*{_KEY})*\s*=\s*")
# Keys whose values (and everything below them) are secret: hosts.toml's `header`; containerd's
# CRI registry `headers`, `auth` tables and their `password`, `auth`, `identitytoken` fields.
SECRET_KEYS = frozenset({"header", "headers", "auth", "password", "identitytoken", "token"})
_SECRET_WORD = re.compile(r"header|auth|password|token", re.IGNORECASE)
# `header = {...}`, `header.Name = ...`, `x = { header = ... }`: everything after the `=`
_HEADER_KEY = re.compile(r"^(.*?(?:header|auth|password|token)[^=]*=\s*)(.+)$", re.IGNORECASE)


def _is_header(key: object) -> bool:
    return str(key).lower() in SECRET_KEYS


def _header_values(value: Any, under: bool = False) -> Iterable[Any]:
    """Every value (string, number, date...) below a `header` key, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _header_values(item, under or _is_header(key))
    elif isinstance(value, list):
        for item in value:
            yield from _header_values(item, under)
    elif under:
        yield value


def redact_hosts_toml(text: str) -> str:
    """The text with every header value replaced by <redacted>, parseable or not; URL user info
    (`user:password@`) is redacted too."""
    try:
        if too_complex(text):
            raise ValueError("too complex to parse")
        values = list(_header_values(tomllib.loads(text)))
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        return redact_text(_redact_lines(text))
    if not values:
        return redact_text(text)
    secrets = {v for v in values if isinstance(v, str) and v}
    structured = _redact_structured(text)
    if structured is not None:  # and the same secret pasted elsewhere, e.g. in a comment
        for secret in sorted((s for s in secrets if len(s) >= 6), key=len, reverse=True):
            structured = structured.replace(secret, REDACTED)
        return redact_text(structured)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return redact_text(_redact_lines(text))  # also catches values split across lines or escaped


def _redact_structured(text: str) -> str | None:
    """Replace the values in place with tomlkit (formatting kept); None when that fails."""
    try:
        import tomlkit

        doc = tomlkit.parse(text)
        _replace_in(doc, False)
        out = tomlkit.dumps(doc)
        left = [v for v in _header_values(tomllib.loads(out)) if v != REDACTED]
    except Exception:  # tomlkit cannot handle every file tomllib reads: fall back to lines
        return None
    return None if left else str(out)


def _replace_in(container: Any, under: bool) -> None:
    if isinstance(container, dict):
        for key in list(container.keys()):
            item = container[key]
            inside = under or _is_header(key)
            if isinstance(item, (dict, list)):
                _replace_in(item, inside)
            elif inside:
                container[key] = REDACTED
    elif isinstance(container, list):
        for i, item in enumerate(list(container)):
            if isinstance(item, (dict, list)):
                _replace_in(item, under)
            elif under:
                container[i] = REDACTED


def _redact_lines(text: str) -> str:
    """Line by line, for text that does not parse: every value in a table whose name mentions
    `header`, every value after a key mentioning `header`, and the lines that continue such a
    value (multi-line strings and arrays) up to the next key or table. Errs on the side of hiding.
    """
    out: list[str] = []
    in_header = False  # inside a table whose name mentions "header"
    open_value = False  # the last redacted value may go on over the next lines
    in_string = ""  # the quotes of a multi-line string the last redacted value opened
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        eol = line[len(body) :]
        key = _KEY_LIKE.match(body)
        if in_string:
            if in_string in body:
                in_string = ""
            body = body[: len(body) - len(body.lstrip())] + REDACTED
        elif _SECTION.match(body) and (not open_value or _section_like(body)):
            in_header = bool(_SECRET_WORD.search(body))
            open_value = False
        elif key and (in_header or _SECRET_WORD.search(key.group(0))):
            in_string = _opens_string(body[key.end() :])
            body, open_value = f"{key.group(0)}{_quote(REDACTED)}", True
        elif m := _HEADER_KEY.match(body):  # e.g. `"https://x" = { header = { ... } }`
            in_string = _opens_string(m.group(2))
            body, open_value = f"{m.group(1)}{_quote(REDACTED)}", True
        elif key:
            open_value = False
        elif body.strip() and (open_value or (in_header and not body.lstrip().startswith("#"))):
            body = body[: len(body) - len(body.lstrip())] + REDACTED
        out.append(body + eol)
    return "".join(out)


def _opens_string(value: str) -> str:
    """The quotes of a multi-line string that `value` opens and does not close, else ""."""
    for quotes in ('"""', "'''"):
        if value.count(quotes) % 2:
            return quotes
    return ""


def _section_like(line: str) -> bool:
    return bool(re.match(r"""^\s*\[\[?[\w"'. :/@-]+\]\]?\s*(#.*)?$""", line.rstrip("\r\n")))


def _quote(s: str) -> str:
    return f'"{s}"'

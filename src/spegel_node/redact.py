"""Credentials in TOML the agent shows (hosts.toml headers; containerd's registry `auth`,
`headers`, passwords and tokens): find them so no output ever shows them."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from typing import Any, TextIO

from spegel_node import tomlload

REDACTED = "<redacted>"
_USERINFO = re.compile(r"(?<=//)[^/?#\s'\"]*@")  # up to the last "@": passwords hold "@" too
_SECTION = re.compile(r"^\s*\[")
_KEY = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY_LIKE = re.compile(rf"^\s*{_KEY}(?:\s*\.\s*{_KEY})*\s*=\s*")
# Keys whose values (and everything below them) are secret: hosts.toml's `header`; containerd's
# CRI registry `headers`, `auth` tables and their `password`, `auth`, `identitytoken` fields.
SECRET_KEYS = frozenset({"header", "headers", "auth", "password", "identitytoken", "token"})
_SECRET_WORD = re.compile(r"header|auth|password|token", re.IGNORECASE)
# `header = {...}`, `header.Name = ...`, `x = { header = ... }`: everything after the `=`
_HEADER_KEY = re.compile(r"^(.*?(?:header|auth|password|token)[^=]*=\s*)(.+)$", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with any user info (`user:password@`) replaced, for messages; also without scheme."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    if "@" in authority:
        authority = "<redacted>@" + authority.rsplit("@", 1)[1]
    return scheme + sep + authority + rest[end:]


def redact_text(text: str) -> str:
    """Free text (a parser's message) with the user info of any URL in it replaced."""
    return _USERINFO.sub("<redacted>@", text)


def redact_output(text: str) -> str:
    """The last step of every output (reports, JSON, doctor, `run`'s log lines): URL user info
    out of whatever text reaches it. Header values and containerd's credentials never get this
    far (`redact_hosts_toml` takes them out of what is shown of a file)."""
    return redact_text(text)


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
        values = list(_header_values(tomlload.loads(text)))
    except tomlload.LoadError:
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
        left = [v for v in _header_values(tomlload.loads(out)) if v != REDACTED]
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


class RedactingStream(io.TextIOBase):
    """stdout or stderr with `redact_output` applied to each whole line before it is written:
    the one place every output passes (cli.main installs it around every command). A line is
    held until its newline or a flush, so no URL is ever cut in two between writes."""

    _HOLD_LIMIT = 1 << 16  # a longer line without a newline goes out in pieces

    def __init__(self, inner: TextIO) -> None:
        super().__init__()
        self.inner = inner
        self._pending = ""

    def write(self, text: str) -> int:
        data = self._pending + text
        head, newline, tail = data.rpartition("\n")
        if newline:
            self.inner.write(redact_output(head + newline))
        self._pending = tail if newline else data
        if len(self._pending) > self._HOLD_LIMIT:
            self.inner.write(redact_output(self._pending))
            self._pending = ""
        return len(text)

    def flush(self) -> None:
        if getattr(self.inner, "closed", False):  # e.g. at interpreter exit, after the inner one
            self._pending = ""
            return
        if self._pending:
            pending, self._pending = self._pending, ""
            self.inner.write(redact_output(pending))
        self.inner.flush()

    def isatty(self) -> bool:
        return self.inner.isatty()

    def fileno(self) -> int:
        return self.inner.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.inner, "errors", None)

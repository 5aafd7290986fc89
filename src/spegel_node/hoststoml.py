"""hosts.toml text operations: render a managed file, merge the Spegel mirrors in, strip them.

Edits are made on the text itself, so every byte the operation does not own stays as it was
(comments, quoting, indentation, k3s's bare `[host]`, Talos's indented tables). The file is cut
into pieces at its table headers; tomllib decides what is a header (a `[` line inside a
multi-line string or array is not) and what each header names. Every edit is checked afterwards
by parsing the result: if the data is not exactly what was intended (for example host entries
written as inline tables or dotted keys, which cannot be cut out), HostsTomlError is raised and
nothing is returned.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from spegel_node import tomlload
from spegel_node.compat import zip_strict
from spegel_node.errors import SpegelNodeError
from spegel_node.redact import redact_text, redact_url

MANAGED_HEADER = "# managed by spegel-node"

_CANDIDATE = re.compile(r"^[ \t]*\[", re.MULTILINE)
_COMMENT_LINE = re.compile(r"[ \t]*#[^\n]*\n")
_WORK_FACTOR = 20  # bytes parsed per input byte while finding headers, before giving up


class HostsTomlError(SpegelNodeError):
    """The text is not parseable TOML, or not a table where one is expected."""


@dataclass(frozen=True)
class MirrorHost:
    url: str  # e.g. "http://10.0.0.5:29999"
    capabilities: tuple[str, ...]  # ("pull", "resolve") or ("pull",)
    dial_timeout: str  # "200ms"


@dataclass(frozen=True)
class _Piece:
    """A slice of the file: the part before the first table (path None) or one table."""

    text: str
    path: tuple[str, ...] | None

    @property
    def host_url(self) -> str | None:
        """The URL when this piece is `[host."URL"]` or a table below it."""
        if self.path is not None and len(self.path) >= 2 and self.path[0] == "host":
            return self.path[1]
        return None


# ---------------------------------------------------------------- public API


def is_managed(text: str) -> bool:
    """True when the first line is exactly MANAGED_HEADER (a file this tool created)."""
    return text.split("\n", 1)[0].rstrip("\r") == MANAGED_HEADER


def host_urls(text: str) -> list[str]:
    """The `[host."URL"]` keys in file order, as written."""
    return list(_hosts(_load(text)))


def mirrors_first(text: str, mirrors: Sequence[MirrorHost]) -> bool:
    """True when the first host tables are exactly these mirrors, in order, with these values."""
    return _mirrors_first(_load(text), _dedupe(mirrors))


def render_managed(server: str | None, mirrors: Sequence[MirrorHost]) -> str:
    """A whole new file: the managed header, `server` (unless None), one table per mirror."""
    head = MANAGED_HEADER + "\n"
    if server is not None:
        head += f"server = {_quote(server)}\n"
    tables = [_render_table(m, "", "\n") for m in _dedupe(mirrors)]
    return head + ("\n" + "\n".join(tables) if tables else "")


def merge(existing: str, mirrors: Sequence[MirrorHost]) -> str:
    """Put the Spegel mirrors first and keep everything else byte for byte.

    Host tables for the same URLs (after stripping one trailing "/") are replaced, sub-tables
    included. The new tables go right before the first remaining host table, with its
    indentation (comment lines directly above that table stay above it), or at the end after a
    blank line when there is none. Returns `existing` itself when the mirrors are already first
    with exactly these values (and no other keys in their tables).
    """
    wanted = _dedupe(mirrors)
    doc = _load(existing)
    if _mirrors_first(doc, wanted):
        return existing
    nl = _newline(existing)
    pieces = _drop(_split(existing), {mirror_key(m.url) for m in wanted}, nl)
    result = _insert(pieces, wanted, nl)
    expected_hosts = {m.url: _table_value(m) for m in wanted}
    expected_hosts.update(_without(_hosts(doc), {mirror_key(m.url) for m in wanted}))
    _verify(result, doc, expected_hosts, "merge the Spegel mirrors into")
    return result


def strip(existing: str, mirror_urls: Iterable[str]) -> str:
    """Remove the host tables for these URLs, their sub-tables and comment lines directly above.

    When they were the last thing in the file, one blank line before them goes too (the one
    `merge` adds when it appends). Returns `existing` itself when none of the URLs is there.
    """
    urls = {mirror_key(u) for u in mirror_urls}
    doc = _load(existing)
    hosts = _hosts(doc)
    if not any(mirror_key(u) in urls for u in hosts):
        return existing
    result = "".join(p.text for p in _drop(_split(existing), urls, _newline(existing)))
    _verify(result, doc, _without(hosts, urls), "remove the Spegel mirrors from")
    return result


def mirror_key(url: str) -> str:
    """A host URL compared as containerd dials it: without a trailing "/" or "/v2" (k3s writes
    mirror endpoints as `http://IP:PORT/v2`), so two URLs of the same mirror compare equal."""
    url = url[:-1] if url.endswith("/") else url
    return url[:-3] if url.endswith("/v2") else url


# ---------------------------------------------------------------- parsing


def _load(text: str) -> dict[str, Any]:
    try:
        doc = tomlload.loads(text)
    except tomlload.TomlLoadError as e:
        raise HostsTomlError(redact_text(str(e))) from e
    _hosts(doc)
    return doc


def _hosts(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsTomlError("'host' is not a table")
    for url, table in hosts.items():
        if not isinstance(table, dict):
            raise HostsTomlError(f"host entry {redact_url(url)!r} is not a table")
    return hosts


def _parses(text: str) -> bool:
    try:
        tomlload.loads(text)
    except tomlload.LoadError:
        return False
    return True


@functools.lru_cache(maxsize=4096)  # doctor and validate see the same Spegel header per file
def table_header_path(line: str) -> tuple[str, ...] | None:
    """The key path a header line names (`[host."a"]` -> ("host", "a")), None if not a header."""
    if not line.lstrip(" \t").startswith("["):
        return None
    try:
        node: Any = tomlload.loads(line)
    except tomlload.LoadError:
        return None
    path: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        key, node = next(iter(node.items()))
        path.append(key)
    return tuple(path) if path else None


def _headers(text: str) -> list[tuple[int, tuple[str, ...]]]:
    """Offsets and key paths of the real table headers.

    A `[` line is a header when the text since the previous header parses on its own: inside a
    multi-line string or array it would end unterminated.
    """
    found: list[tuple[int, tuple[str, ...]]] = []
    boundary = 0
    budget = _WORK_FACTOR * len(text) + 100_000
    for m in _CANDIDATE.finditer(text):
        pos = m.start()
        end = text.find("\n", pos)
        path = table_header_path(text[pos : len(text) if end < 0 else end + 1])
        if path is None:
            continue
        budget -= pos - boundary
        if budget < 0:
            raise HostsTomlError("too many '[' lines inside strings or arrays to edit this file")
        if _parses(text[boundary:pos]):
            found.append((pos, path))
            boundary = pos
    return found


def _comment_start(text: str, lo: int, hi: int) -> int:
    """Where the comment lines directly above the header at `hi` begin (`hi` if none).

    Comments at the very top of the file stay there (k3s marks its files with one).
    """
    start = hi
    while start > lo:
        line_start = max(text.rfind("\n", lo, start - 1) + 1, lo)
        if not _COMMENT_LINE.fullmatch(text, line_start, start):
            break
        start = line_start
    if start == hi or not text[:start].strip() or not _parses(text[lo:start]):
        return hi
    return start


def _split(text: str) -> list[_Piece]:
    """The file as pieces whose texts add up to it: the part before the first table, then tables."""
    cuts = [0]
    paths: list[tuple[str, ...] | None] = [None]
    previous = 0
    for pos, path in _headers(text):
        cuts.append(_comment_start(text, previous, pos))
        paths.append(path)
        previous = pos
    cuts.append(len(text))
    return [_Piece(text[a:b], p) for a, b, p in zip(cuts, cuts[1:], paths)]


# ---------------------------------------------------------------- editing


def _drop(pieces: list[_Piece], urls: set[str], nl: str) -> list[_Piece]:
    """Pieces without the tables of these URLs.

    When the tables removed were the last thing in the file, one blank line above them goes too:
    that is the separator `_insert` adds when it appends at the end.
    """
    keep = [p.host_url is None or mirror_key(p.host_url) not in urls for p in pieces]
    kept = [p for p, k in zip_strict(pieces, keep) if k]
    if kept and not keep[-1] and kept[-1].text.endswith(nl + nl):
        kept[-1] = _Piece(kept[-1].text[: -len(nl)], kept[-1].path)
    return [p for p in kept if p.text]


def _insert(pieces: list[_Piece], mirrors: Sequence[MirrorHost], nl: str) -> str:
    texts = [p.text for p in pieces]
    for i, piece in enumerate(pieces):
        if piece.host_url is not None:
            indent = _header_indent(piece.text)
            before = [_render_table(m, indent, nl) + nl for m in mirrors]
            return "".join(texts[:i] + before + texts[i:])
    body = "".join(texts)
    tables = nl.join(_render_table(m, "", nl) for m in mirrors)
    if not body or not tables:
        return body + tables
    if not body.endswith("\n"):
        body += nl
    return body + nl + tables


def _header_indent(piece_text: str) -> str:
    for line in piece_text.split("\n"):
        stripped = line.lstrip(" \t")
        if stripped.startswith("["):
            return line[: len(line) - len(stripped)]
    return ""


def _render_table(mirror: MirrorHost, indent: str, nl: str) -> str:
    inner = indent + "  "
    caps = ", ".join(_quote(c) for c in mirror.capabilities)
    return (
        f"{indent}[host.{_quote(mirror.url)}]{nl}"
        f"{inner}capabilities = [{caps}]{nl}"
        f"{inner}dial_timeout = {_quote(mirror.dial_timeout)}{nl}"
    )


@functools.lru_cache(maxsize=256)  # the same few URLs and words, once per file written
def _quote(value: str) -> str:
    import tomlkit  # only when writing: a no-op apply, validate and doctor never need it

    return str(tomlkit.string(value).as_string())


def _verify(result: str, before: dict[str, Any], hosts: dict[str, Any], what: str) -> None:
    """Check that `result` holds exactly `before` with its host entries replaced by `hosts`."""
    try:
        after = tomlload.loads(result)
        after_hosts = _hosts(after)
    except (tomlload.LoadError, HostsTomlError):
        after, after_hosts = {}, {}
    expected = {**before, "host": hosts}
    same = list(after_hosts) == list(hosts) and _comparable(after) == _comparable(expected)
    if not same:
        raise HostsTomlError(
            f"cannot {what} this file: its host entries are not all written as "
            '[host."URL"] tables (inline tables or dotted keys)'
        )


def _comparable(doc: dict[str, Any]) -> Any:
    """A document in a form to compare: an empty `host` table same as none."""
    return _canonical({k: v for k, v in doc.items() if not (k == "host" and v == {})})


def _canonical(value: Any) -> Any:
    """Key order ignored, NaN equal to itself."""
    if isinstance(value, dict):
        return ("table", sorted((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        return ("float", repr(value))
    return value


# ---------------------------------------------------------------- helpers


def _dedupe(mirrors: Sequence[MirrorHost]) -> list[MirrorHost]:
    seen: set[str] = set()
    out: list[MirrorHost] = []
    for m in mirrors:
        if mirror_key(m.url) not in seen:
            seen.add(mirror_key(m.url))
            out.append(m)
    return out


def _table_value(mirror: MirrorHost) -> dict[str, Any]:
    return {"capabilities": list(mirror.capabilities), "dial_timeout": mirror.dial_timeout}


def _without(hosts: dict[str, dict[str, Any]], urls: set[str]) -> dict[str, Any]:
    return {u: t for u, t in hosts.items() if mirror_key(u) not in urls}


def _mirrors_first(doc: dict[str, Any], mirrors: Sequence[MirrorHost]) -> bool:
    first = list(_hosts(doc).items())[: len(mirrors)]
    if len(first) < len(mirrors):
        return False
    return all(
        mirror_key(url) == mirror_key(m.url) and table == _table_value(m)
        for (url, table), m in zip_strict(first, mirrors)
    )


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"

"""The one guarded way to parse TOML and JSON from the node (containerd's config, hosts.toml,
spegel-node's config and state record, containerd's JSON answers).

tomllib has two failure modes that are not `TOMLDecodeError`: deep nesting raises
`RecursionError`, and a dotted key of many parts takes time that grows with the square of its
parts (a 40 KB line of 20,000 parts takes about 6 s). Every reader goes through `loads` so that
each gets the same guards and one error type with a one-line reason.
"""

from __future__ import annotations

import json
import re
from typing import Any

from spegel_node.compat import tomllib
from spegel_node.errors import SpegelNodeError

MAX_BYTES = 4 << 20  # far above any real containerd config or hosts.toml
MAX_DOT_WORK = 20_000_000  # sum over lines of (dots on the line) ** 2; about half a second


_STRINGS = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'')


class LoadError(SpegelNodeError):
    """Text that is not TOML (or JSON) this agent will parse; the message is one line."""


TomlLoadError = LoadError


def too_complex(text: str) -> bool:
    """True for text that would take tomllib minutes: its cost grows with the square of how
    many parts a dotted key has, and keys stay on one line. Dots inside strings cost nothing
    (a one-line list of 5,000 registry URLs is fine). Real files are far below."""
    work = 0
    for line in text.split("\n"):
        dots = line.count(".")
        if dots > 64:  # a line that could matter: count the dots outside strings only
            dots = _STRINGS.sub("", line).count(".")
        work += dots * dots
    return work > MAX_DOT_WORK


def loads(data: str | bytes) -> dict[str, Any]:
    """Parse TOML text (bytes must be UTF-8); raises TomlLoadError, nothing else."""
    if len(data) > MAX_BYTES:
        raise TomlLoadError(f"larger than {MAX_BYTES >> 20} MiB")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TomlLoadError("not UTF-8 text") from e
    if too_complex(data):
        raise TomlLoadError("too complex to parse safely (too many dotted key parts on one line)")
    try:
        return tomllib.loads(data)
    except tomllib.TOMLDecodeError as e:
        raise TomlLoadError(f"not valid TOML: {' '.join(str(e).split())}") from e
    except RecursionError as e:
        raise TomlLoadError("not valid TOML: nested too deeply") from e


def loads_json(data: str | bytes) -> Any:
    """Parse JSON text; raises LoadError, nothing else (deep nesting included)."""
    if len(data) > MAX_BYTES:
        raise LoadError(f"larger than {MAX_BYTES >> 20} MiB")
    try:
        return json.loads(data)
    except UnicodeDecodeError as e:
        raise LoadError("not UTF-8 text") from e
    except ValueError as e:
        raise LoadError(f"not valid JSON: {' '.join(str(e).split())}") from e
    except RecursionError as e:
        raise LoadError("not valid JSON: nested too deeply") from e

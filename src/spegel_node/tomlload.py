"""The one guarded way to parse TOML from the node (containerd's config, hosts.toml).

tomllib has two failure modes that are not `TOMLDecodeError`: deep nesting raises
`RecursionError`, and a dotted key of many parts takes time that grows with the square of its
parts (a 40 KB line of 20,000 parts takes about 6 s). Every reader goes through `loads` so that
each gets the same guards and one error type with a one-line reason.
"""

from __future__ import annotations

from typing import Any

from spegel_node.compat import tomllib
from spegel_node.errors import SpegelNodeError

MAX_BYTES = 4 << 20  # far above any real containerd config or hosts.toml
MAX_DOT_WORK = 20_000_000  # sum over lines of (dots on the line) ** 2; about half a second


class TomlLoadError(SpegelNodeError):
    """Text that is not TOML this agent will parse; the message is one line."""


def too_complex(text: str) -> bool:
    """True for text that would take tomllib minutes: its cost grows with the square of how
    many parts a dotted key has, and keys stay on one line. Real files are far below."""
    return sum(line.count(".") ** 2 for line in text.split("\n")) > MAX_DOT_WORK


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

"""The project's expected failures. The CLI turns each into one line on stderr and an exit code."""

from __future__ import annotations


class SpegelNodeError(Exception):
    """An expected failure with a message meant for the operator."""

    exit_code = 1


class BadInput(SpegelNodeError):
    """Usage errors, unreadable or invalid config, invalid registry names: exit 2, nothing written."""

    exit_code = 2


class Refused(SpegelNodeError):
    """The node cannot or must not be changed (read-only dir, distro-owned hosts dir, full disk)."""

    exit_code = 1


def denied_to_non_root(err: BaseException) -> bool:
    """A permission error that running as root would not have hit."""
    import errno
    import os

    return (
        isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0
    )


def needs_root_hint(count: int = 1) -> str:
    paths = "this path" if count == 1 else "these paths"
    return f"spegel-node needs root (or read/write access to {paths})"


class NeedsRoot(Refused):
    """A non-root run met a node path it may not read or write: one line, exit 1."""

    def __init__(self, paths: list[str] | tuple[str, ...]) -> None:
        named = list(dict.fromkeys(p for p in paths if p))
        names = ", ".join(named) or "a node path"
        super().__init__(f"permission denied on {names}: {needs_root_hint(max(1, len(named)))}")

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

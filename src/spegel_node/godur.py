"""Go's time.ParseDuration, as containerd reads `dial_timeout`: one or more <number><unit>
("200ms", "1m30s"), an optional sign, or a bare "0"; an int64 of nanoseconds at most."""

from __future__ import annotations

import re

GO_DURATION = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+$|^0$")
GO_MAX_NS = (1 << 63) - 1  # time.Duration is an int64 of nanoseconds
_UNIT_NS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def duration_ns(value: str) -> float | None:
    """A Go duration in nanoseconds (sign included); None when it is not one."""
    if not GO_DURATION.match(value):
        return None
    sign = -1.0 if value.startswith("-") else 1.0
    body = value.lstrip("+-")
    if body == "0":
        return 0.0
    parts = _DURATION_PART.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        return None
    return sign * sum(float(n) * _UNIT_NS[u] for n, u in parts)


def go_duration_seconds(value: str) -> float:
    """A Go duration (already matched by GO_DURATION) in seconds: "1m30s" -> 90.0."""
    ns = duration_ns(value)
    return 0.0 if ns is None else ns / 1e9

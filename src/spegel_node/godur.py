"""Go's time.ParseDuration, as containerd reads `dial_timeout` (and spegel-node its own
durations): one or more <number><unit> ("200ms", "1m30s"), an optional sign, or a bare "0";
an int64 of nanoseconds at most. The one duration parser."""

from __future__ import annotations

import re

# the shape alone, without Go's range check (parse_go_duration decides)
GO_DURATION = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+$|^0$")
GO_MAX_NS = (1 << 63) - 1  # time.Duration is an int64 of nanoseconds
_UNIT_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9}
_UNIT_NS.update({"m": 60 * 10**9, "h": 3600 * 10**9})
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(value: str) -> int | None:
    """What Go's time.ParseDuration makes of `value`, in nanoseconds; None where Go returns an
    error: not a duration ("abc", "200", "1e3s") or beyond an int64 of nanoseconds ("3000000h")."""
    sign = -1 if value[:1] == "-" else 1
    body = value[1:] if value[:1] in "+-" else value
    if body == "0":
        return 0
    parts = _DURATION_PART.findall(body)
    if not body or not parts or "".join(n + u for n, u in parts) != body:
        return None
    total = 0
    for number, unit in parts:
        whole, _, frac = number.partition(".")
        scale = _UNIT_NS[unit]
        total += int(whole or "0") * scale
        if frac:  # Go truncates the fraction's share of each part to whole nanoseconds
            total += int(frac) * scale // 10 ** len(frac)
        if total > GO_MAX_NS + (1 if sign < 0 else 0):
            return None
    return sign * total


def go_duration_seconds(value: str) -> float:
    """A Go duration (already checked) in seconds: "1m30s" -> 90.0."""
    return (parse_go_duration(value) or 0) / 1e9

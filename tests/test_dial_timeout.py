"""dial_timeout values in a hosts.toml, against each containerd version's own judgement
(tests/judge): validate calls an error exactly what containerd drops, and warns about what it
reads but cannot use (negative: every dial times out at once; zero: no dial timeout)."""

from __future__ import annotations

import pytest
from peers.build import JUDGE_VERSIONS
from support.judge import judge_texts

from spegel_node.errors import BadInput
from spegel_node.godur import parse_go_duration
from spegel_node.settings import settings_from_mapping
from spegel_node.validate import (
    DIAL_TIMEOUT_SINCE,
    ERROR,
    WARNING,
    parse_containerd_version,
    validate_text,
)

VALUES = (
    "3000000h",
    "2562047h",
    "2562048h",
    "9223372036854775807ns",
    "9223372036854775808ns",
    "-1s",
    "-0",
    "0s",
    "0",
    "abc",
    "200",
    "1e3s",
    "",
    "200ms",
    ".5s",
    "1h1h",
    "+1s",
)
WARNED = {"-1s": "dial_timeout.negative", "0s": "dial_timeout.zero", "0": "dial_timeout.zero"}
WARNED["-0"] = "dial_timeout.zero"


def hosts_toml(value: str) -> bytes:
    return (
        'server = "https://r.test"\n[host."http://127.0.0.1:29999"]\n'
        f'  capabilities = ["pull"]\n  dial_timeout = "{value}"\n'
    ).encode()


@pytest.mark.parametrize("version", JUDGE_VERSIONS)
def test_validate_agrees_with_containerd_on_dial_timeout(version: str) -> None:
    verdicts = judge_texts(version, [hosts_toml(v) for v in VALUES])
    v = parse_containerd_version(version)
    honoured = v >= DIAL_TIMEOUT_SINCE
    for value, verdict in zip(VALUES, verdicts, strict=True):
        found = validate_text(
            hosts_toml(value), display_path="h", file_dir=None, containerd_version=v
        )
        errors = [f.code for f in found if f.severity == ERROR]
        assert bool(errors) == verdict.rejected, (version, value, verdict, errors)
        warnings = {f.code for f in found if f.severity == WARNING}
        if honoured and value in WARNED:
            assert verdict.status == "used" and WARNED[value] in warnings, (value, found)
        if not honoured and value:
            assert warnings == {"dial_timeout.ignored"}, (value, found)
    if honoured:  # the facts the rules stand on
        rejected = {v for v, j in zip(VALUES, verdicts, strict=True) if j.rejected}
        assert rejected == {
            "3000000h",
            "2562048h",
            "9223372036854775808ns",
            "abc",
            "200",
            "1e3s",
        }


def test_out_of_range_message_names_the_limit() -> None:
    found = validate_text(
        hosts_toml("3000000h"), display_path="h", file_dir=None, containerd_version=(2, 1, 0)
    )
    assert [f.code for f in found] == ["dial_timeout.invalid"]
    assert "2562047h" in found[0].message and found[0].line == 4


def test_unknown_version_still_checks_the_value() -> None:
    found = validate_text(hosts_toml("-1s"), display_path="h", file_dir=None)
    assert [(f.severity, f.code) for f in found] == [(WARNING, "dial_timeout.negative")]


@pytest.mark.parametrize(
    ("value", "ns"),
    [
        ("2562047h", 2562047 * 3600 * 10**9),
        ("9223372036854775807ns", (1 << 63) - 1),
        ("-9223372036854775808ns", -(1 << 63)),
        ("1.5µs", 1500),
        ("5.s", 5 * 10**9),
        ("-0", 0),
        ("1m30s", 90 * 10**9),
    ],
)
def test_go_duration_exact(value: str, ns: int) -> None:
    assert parse_go_duration(value) == ns


@pytest.mark.parametrize("value", ["", ".s", "1", "1e3s", "9223372036854775808ns", "1d", "s"])
def test_go_duration_refused(value: str) -> None:
    assert parse_go_duration(value) is None


@pytest.mark.parametrize("value", ["3000000h", "-1s", "0s", "0", "abc", "2562048h"])
def test_config_dial_timeout_refused(value: str) -> None:
    with pytest.raises(BadInput, match="dial_timeout"):
        settings_from_mapping({"dial_timeout": value})


def test_config_dial_timeout_at_the_limit_is_accepted() -> None:
    assert settings_from_mapping({"dial_timeout": "2562047h"}).dial_timeout == "2562047h"

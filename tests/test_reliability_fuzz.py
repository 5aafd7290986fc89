"""Fuzzing with hypothesis: the config loader, registry parsing, the hosts.toml validator, the
hosts.toml editor and the redactor. Only the project's own error types (SpegelNodeError and its
subclasses) may escape, and what they accept must be safe to use as a directory name."""

from __future__ import annotations

import contextlib
import datetime
import os
import string
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spegel_node import hoststoml
from spegel_node.errors import BadInput, SpegelNodeError
from spegel_node.hoststoml import MirrorHost
from spegel_node.node import Node
from spegel_node.redact import REDACTED, redact_hosts_toml
from spegel_node.registry import parse_mirror_url, parse_registry
from spegel_node.settings import _FIELDS, Settings, load_settings, settings_from_mapping
from spegel_node.validate import ERROR, WARNING, Finding, validate_text

# 300 examples each, the same ones every run (CI stays deterministic); set SPEGEL_NODE_FUZZ=N for
# N fresh random examples each (docs/reliability.md gives the figures of such a run).
_FRESH = int(os.environ.get("SPEGEL_NODE_FUZZ", "0"))
FUZZ = settings(
    max_examples=_FRESH or 300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=not _FRESH,
    database=None,
)

# --- values TOML can hold -----------------------------------------------------------------------

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.datetimes(),
    st.dates(),
    st.times(),
    st.datetimes(timezones=st.just(datetime.UTC)),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)

# URL-shaped text: the characters that matter for escaping a directory and for URL parsing.
URL_ALPHABET = string.ascii_letters + string.digits + ".-_:/\\@?#%[]\x00 \t\n~!$&'()*+,;=" + "é／․"
url_like = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=URL_ALPHABET, max_size=40),
    st.builds(
        lambda scheme, host, tail: f"{scheme}{host}{tail}",
        st.sampled_from(["https://", "http://", "ftp://", "", "//", "HTTPS://", "http:/"]),
        st.text(alphabet=URL_ALPHABET, min_size=0, max_size=30),
        st.sampled_from(["", ":5000", ":0", ":65536", "/", "/v2", "?x", "#", "/..", ":x"]),
    ),
)

config_mappings = st.one_of(
    st.dictionaries(st.text(max_size=20), toml_values, max_size=5),
    st.dictionaries(st.sampled_from(sorted(_FIELDS)), toml_values, max_size=6),
    st.fixed_dictionaries(
        {},
        optional={
            "registries": st.lists(url_like | toml_scalars, max_size=5),
            "extra_mirrors": st.lists(url_like, max_size=3),
            "host_port": st.integers(min_value=-5, max_value=70000) | toml_scalars,
            "node_ip": st.sampled_from(["auto", "10.0.0.5", "::1", "fe80::1%eth0", "x"])
            | st.text(max_size=20),
            "dial_timeout": st.sampled_from(["200ms", "1", "1h2m", "", "-0"]) | st.text(max_size=8),
            "gate_failures": st.integers(min_value=-2, max_value=2000),
            "resolve_tags": st.booleans() | toml_scalars,
            "hosts_dir": st.text(alphabet="/.a\x00\\", max_size=12) | st.text(max_size=12),
            "containerd_socket": st.text(max_size=12),
            "containerd_config": st.text(max_size=12),
        },
    ),
)


def _safe_dir_name(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..")
        and not name.startswith(".")
        and not any(c in name for c in "/\\\x00")
    )


@FUZZ
@given(config_mappings)
def test_settings_from_mapping_raises_only_bad_input(data: dict[str, Any]) -> None:
    try:
        result = settings_from_mapping(data, "fuzz.toml")
    except BadInput as e:
        assert "\n" not in str(e)
        return
    assert isinstance(result, Settings)
    assert 1 <= result.host_port <= 65535
    for registry in result.registries:
        assert all(_safe_dir_name(n) for n in registry.dir_names), registry


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_load_settings_of_any_text_raises_only_bad_input(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.toml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            load_settings(Node(Path(d)), path)
        except BadInput as e:
            assert "\n" not in str(e)


@FUZZ
@given(st.binary(max_size=300))
def test_load_settings_of_any_bytes_raises_only_bad_input(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.toml"
        path.write_bytes(data)
        with contextlib.suppress(BadInput):
            load_settings(Node(Path(d)), path)


@FUZZ
@given(url_like)
def test_registry_parsing_accepts_only_names_safe_for_the_hosts_dir(raw: str) -> None:
    for parse in (parse_registry, parse_mirror_url):
        try:
            parsed = parse(raw)
        except BadInput as e:
            assert "\n" not in str(e).replace(repr(raw), "")
            continue
        if parse is parse_registry:
            assert all(_safe_dir_name(n) for n in parsed.dir_names), (raw, parsed)  # type: ignore[union-attr]
            assert parsed.url.startswith(("http://", "https://"))  # type: ignore[union-attr]
        else:
            assert parsed == parse_mirror_url(parsed)  # type: ignore[arg-type]


# --- hosts.toml text --------------------------------------------------------------------------

# TOML-ish lines built from the pieces hosts.toml files are made of, so that many examples parse.
toml_lines = st.sampled_from(
    [
        'server = "https://ghcr.io"',
        "server = 5",
        'server = "127.0.0.1:5000"',
        "[host]",
        '[host."https://a.example"]',
        "[host.'http://10.0.0.5:29999']",
        '[host."https://a.example".header]',
        '  capabilities = ["pull", "resolve"]',
        '  capabilities = "pull"',
        '  capabilities = ["bogus", "referrers"]',
        "  skip_verify = true",
        '  skip_verify = "yes"',
        '  ca = "ca.crt"',
        '  ca = ["/etc/x.crt", 3]',
        '  client = [["c.crt", "k.key"], ["only"]]',
        '  dial_timeout = "200ms"',
        '  dial_timeout = "1"',
        '  Authorization = "Bearer tok"',
        '  header = { X = ["a", "b"] }',
        "  override_path = 1",
        'host = "x"',
        "[[host]]",
        "# a comment",
        "",
        "a.b.c = 1",
        '"quoted key" = """multi',
        'line"""',
        "x = [",
        "]",
        '[host."https://u:p@a.example"]',
        "rewrite = { '^x' = 'y' }",
    ]
)
toml_ish = st.lists(toml_lines | st.text(max_size=30), max_size=14).map("\n".join)


def _check_findings(findings: list[Finding]) -> None:
    for f in findings:
        assert f.severity in (ERROR, WARNING)
        assert "\n" not in f.message
        # "file.unreadable" from validate_text on in-memory data means a rule crashed inside
        assert f.code != "file.unreadable", f


@FUZZ
@given(st.binary(max_size=400))
def test_validate_text_never_raises_on_bytes(data: bytes) -> None:
    _check_findings(validate_text(data, display_path="/x/hosts.toml", file_dir=None))


@FUZZ
@given(toml_ish, st.sampled_from([None, (1, 6, 20), (2, 0, 6), (2, 2, 0)]))
def test_validate_text_never_raises_on_toml_like_text(
    text: str, version: tuple[int, int, int] | None
) -> None:
    _check_findings(
        validate_text(
            text,
            display_path="/x/hosts.toml",
            file_dir=Path("/nonexistent"),
            containerd_version=version,
        )
    )


MIRRORS = [
    MirrorHost("http://10.0.0.5:29999", ("pull", "resolve"), "200ms"),
    MirrorHost("http://10.0.0.5:30021", ("pull",), "200ms"),
]


@FUZZ
@given(toml_ish | st.text(max_size=200))
def test_merge_and_strip_raise_only_project_errors(text: str) -> None:
    try:
        merged = hoststoml.merge(text, MIRRORS)
    except SpegelNodeError:
        return
    hosts = tomllib.loads(merged).get("host", {})
    assert list(hosts)[:2] == [m.url for m in MIRRORS]
    stripped = hoststoml.strip(merged, [m.url for m in MIRRORS])
    assert not any(m.url in tomllib.loads(stripped).get("host", {}) for m in MIRRORS)


header_values = st.text(
    alphabet=string.ascii_letters + string.digits + "-_+/=", min_size=8, max_size=20
).map(lambda s: "S3CR" + s)


@FUZZ
@given(toml_ish, st.lists(header_values, min_size=1, max_size=3), st.integers(0, 5))
def test_redaction_never_shows_a_header_value(noise: str, secrets: list[str], style: int) -> None:
    first, rest = secrets[0], secrets[1:]
    forms = [
        f'[host."https://a.example".header]\nAuthorization = "{first}"\n',
        f'[host."https://a.example"]\nheader = {{ Authorization = "{first}" }}\n',
        f'[host."https://a.example"]\nheader.Authorization = "{first}"\n',
        f'[header]\nX-Api-Key = [\n  "{first}",\n]\n',
        f'[host."https://a.example".header] # creds\nAuthorization = """\\\n  {first}"""\n',
        f"[host.'https://a.example'.header]\nAuthorization = '''\n{first}'''\n",
    ]
    more = "".join(f'Other{i} = "{s}"\n' for i, s in enumerate(rest))
    text = forms[style] + '[host."https://b.example".header]\n' + more + noise
    out = redact_hosts_toml(text)
    for secret in secrets:
        assert secret not in out
    try:
        parsed = tomllib.loads(out)
    except tomllib.TOMLDecodeError:
        return
    for value in _header_values(parsed):
        assert value == REDACTED


def _header_values(value: Any, under: bool = False) -> list[Any]:
    """Every leaf value below a `header` key (independent of the code under test)."""
    if isinstance(value, dict):
        return [
            leaf
            for key, item in value.items()
            for leaf in _header_values(item, under or key.lower() == "header")
        ]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _header_values(item, under)]
    return [value] if under else []

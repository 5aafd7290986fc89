"""containerd's hosts.toml rules as findings, pinned on the corpus in tests/corpus/hosts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support import pki

from spegel_node.errors import BadInput
from spegel_node.validate import (
    ERROR,
    MAX_BYTES,
    WARNING,
    Finding,
    parse_containerd_version,
    validate_file,
    validate_hosts_dir,
    validate_text,
)

CORPUS = Path(__file__).parent / "corpus" / "hosts"
E, W = ERROR, WARNING

# What each corpus file gives with an unknown containerd version and its certificate files present
# (see SUPPORT_FILES). accept_* has no error, reject_* at least one, ignored_*/warn_* warnings only.
EXPECTED: dict[str, set[tuple[str, str]]] = {
    "accept_client_pairs.toml": set(),
    "accept_crlf.toml": set(),
    "accept_empty.toml": set(),
    "accept_header_like_line_in_string.toml": {(W, "key.unknown")},  # the string's key `note`
    "accept_k3s_generated.toml": set(),
    "accept_microk8s_docker_io.toml": set(),
    "accept_mixed_case_capabilities.toml": set(),
    "accept_person_with_ca_and_header.toml": set(),
    "accept_referrers_new_containerd.toml": {(W, "capabilities.referrers_unsupported")},
    "accept_spegel_init_container.toml": set(),
    "accept_spegel_init_default.toml": set(),
    "accept_spegel_written.toml": set(),
    "accept_talos_generated.toml": set(),
    "ignored_k3s_rewrite.toml": {(W, "key.unknown")},
    "ignored_unknown_key.toml": {(W, "key.unknown")},
    "reject_ca_missing.toml": {(E, "ca.missing")},
    "reject_ca_type.toml": {(E, "ca.type")},
    "reject_capability_string.toml": {(E, "capabilities.type")},
    "reject_capability_unknown.toml": {(E, "capabilities.unknown")},
    "reject_client_missing.toml": {(E, "client.missing")},
    "reject_client_pair.toml": {(E, "client.pair")},
    "reject_client_type.toml": {(E, "client.type")},
    "reject_dial_timeout_no_unit.toml": {(E, "dial_timeout.invalid")},
    "reject_duplicate_table.toml": {(E, "toml.syntax")},
    "reject_header_not_table.toml": {(E, "header.type")},
    "reject_header_type.toml": {(E, "header.type")},
    "reject_host_entry_not_table.toml": {(E, "host.type")},
    "reject_host_not_table.toml": {(E, "host.type")},
    "reject_host_url_control_char.toml": {(E, "host.invalid")},
    "reject_override_path_string.toml": {(E, "override_path.type")},
    "reject_server_invalid.toml": {(E, "server.invalid")},
    "reject_skip_verify_string.toml": {(E, "skip_verify.type")},
    "reject_syntax.toml": {(E, "toml.syntax")},
    "warn_empty_capabilities.toml": {(W, "capabilities.empty")},
    "warn_host_no_scheme.toml": {(W, "host.no_scheme")},
    "warn_server_no_scheme.toml": {(W, "server.no_scheme")},
}
SUPPORT_FILES = {
    "accept_client_pairs.toml": [
        "client.cert",
        "client.key",
        "combined.pem",
        "ca.crt",
        "/etc/certs/extra-ca.crt",
    ],
    "accept_person_with_ca_and_header.toml": ["ca.crt"],
}


def check(
    text: str | bytes, version: tuple[int, int, int] | None = None, file_dir: Path | None = None
) -> list[Finding]:
    return validate_text(
        text, display_path="/etc/x/hosts.toml", file_dir=file_dir, containerd_version=version
    )


def codes(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(f.severity, f.code) for f in findings}


def support_file_text(name: str) -> str:
    """A usable PEM file for a corpus file's `ca`/`client` name (keys match EC_CERT)."""
    if name.endswith(".key"):
        return pki.EC_KEY
    return pki.EC_CERT + pki.EC_KEY if name.endswith(".pem") else pki.EC_CERT


def node_with_support_files(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(root, hosts dir) with the certificate files a corpus file names."""
    root, file_dir = (
        tmp_path / "root",
        tmp_path / "root" / "etc" / "containerd" / "certs.d" / "docker.io",
    )
    file_dir.mkdir(parents=True)
    for f in SUPPORT_FILES.get(name, []):
        target = root / f.lstrip("/") if f.startswith("/") else file_dir / f
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(support_file_text(f))
    return root, file_dir


# ---------------------------------------------------------------- the corpus


def test_every_corpus_file_is_pinned() -> None:
    assert sorted(p.name for p in CORPUS.glob("*.toml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus(name: str, tmp_path: Path) -> None:
    root, file_dir = node_with_support_files(tmp_path, name)
    findings = validate_text(
        (CORPUS / name).read_bytes(), display_path=f"/certs.d/{name}", file_dir=file_dir, root=root
    )
    assert codes(findings) == EXPECTED[name]
    assert all(f.path == f"/certs.d/{name}" for f in findings)
    assert all("\n" not in f.message and f.message for f in findings)
    severities = {f.severity for f in findings}
    if name.startswith("accept_"):
        assert ERROR not in severities
    elif name.startswith("reject_"):
        assert ERROR in severities
    else:
        assert severities == {WARNING}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_via_validate_file_without_support_files(name: str) -> None:
    findings = validate_file(CORPUS / name, display_path=name)
    missing = {(E, "ca.missing"), (E, "client.missing")}
    assert codes(findings) - missing == EXPECTED[name] - missing
    if name in SUPPORT_FILES:
        assert codes(findings) & missing


def test_real_formats_accepted_on_known_versions(tmp_path: Path) -> None:
    for name in [
        "accept_k3s_generated.toml",
        "accept_talos_generated.toml",
        "accept_microk8s_docker_io.toml",
        "accept_spegel_init_container.toml",
        "accept_spegel_written.toml",
    ]:
        for version in [(2, 1, 4), (2, 0, 7)]:
            assert check(corpus_text(name), version, tmp_path) == [], name


def corpus_text(name: str) -> str:
    return (CORPUS / name).read_bytes().decode()


# ---------------------------------------------------------------- version-dependent rules


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (None, {(W, "capabilities.referrers_unsupported")}),
        ((1, 7, 22), {(E, "capabilities.referrers_unsupported")}),
        ((2, 1, 9), {(E, "capabilities.referrers_unsupported")}),
        ((2, 2, 0), set()),
        ((3, 0, 0), set()),
    ],
)
def test_referrers_by_version(version: tuple[int, int, int] | None, expected: set[Any]) -> None:
    assert codes(check(corpus_text("accept_referrers_new_containerd.toml"), version)) == expected


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (None, set()),
        ((1, 6, 20), {(W, "dial_timeout.ignored")}),
        ((1, 7, 22), {(W, "dial_timeout.ignored")}),
        ((2, 0, 0), {(W, "dial_timeout.ignored")}),
        ((2, 0, 6), {(W, "dial_timeout.ignored")}),
        ((2, 0, 7), set()),
        ((2, 1, 0), set()),
    ],
)
def test_dial_timeout_by_version(version: tuple[int, int, int] | None, expected: set[Any]) -> None:
    assert codes(check(corpus_text("accept_spegel_written.toml"), version)) == expected


def test_bad_dial_timeout_only_ignored_on_old_containerd() -> None:
    text = corpus_text("reject_dial_timeout_no_unit.toml")
    assert codes(check(text, (1, 6, 20))) == {(W, "dial_timeout.ignored")}
    assert codes(check(text, (2, 1, 0))) == {(E, "dial_timeout.invalid")}


@pytest.mark.parametrize("value", ['"200ms"', '"1m30s"', '"1.5h"', '".5s"', '"2µs"', '""'])
def test_dial_timeout_valid(value: str) -> None:
    assert check(f"dial_timeout = {value}\n") == []


@pytest.mark.parametrize("value", ['"0"', '"-0"', '"0s"'])
def test_dial_timeout_zero_warns(value: str) -> None:
    """containerd reads it; Go's net.Dialer then has no dial timeout at all."""
    assert codes(check(f"dial_timeout = {value}\n")) == {(W, "dial_timeout.zero")}


@pytest.mark.parametrize("value", ['"1"', '"200"', '"ms"', '"1d"', '"1 s"', "200", '"200ms\\n"'])
def test_dial_timeout_invalid(value: str) -> None:
    assert codes(check(f"dial_timeout = {value}\n")) == {(E, "dial_timeout.invalid")}


# ---------------------------------------------------------------- single rules


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('capabilities = ["PUSH"]', set()),
        ('capabilities = ["pull", 1]', {(E, "capabilities.type")}),
        ("capabilities = 1", {(E, "capabilities.type")}),
        ('ca = ["a.crt", 1]', {(E, "ca.type")}),
        ("ca = { a = 1 }", {(E, "ca.type")}),
        ('client = "c.pem"', set()),
        ('client = ["c.pem", ["c.cert", "c.key"]]', set()),
        ('client = [["a", "b", "c"]]', {(E, "client.pair")}),
        ("client = [[1, 2]]", {(E, "client.type")}),
        ("client = [{ a = 1 }]", {(E, "client.type")}),
        ("header = { A = ['x', 'y'] }", set()),
        ("header = { A = ['x', 2] }", {(E, "header.type")}),
        ("header = { A = { B = 'x' } }", {(E, "header.type")}),
        ("skip_verify = 1", {(E, "skip_verify.type")}),
        ("override_path = true", set()),
        ('server = ""', set()),
        ("server = 5", {(E, "server.type")}),
        ('server = "https://r.example/v2"', set()),
        ('server = "https://[::1]:5000"', set()),
        ('server = "https://[::1"', {(E, "server.invalid")}),
        ('server = "https://r ex.ample"', {(E, "server.invalid")}),
        ('server = "https://r.example/%zz"', {(E, "server.invalid")}),
        # url.Parse accepts these (every containerd keeps the file, tests/judge/): the
        # host fails at pull time only.
        ('server = "httpx.example:5000"', {(W, "server.unusable")}),
        ('server = "ftp://r.example"', {(W, "server.unusable")}),
        ('server = "https://"', {(W, "server.unusable")}),
        ('server = "registry.example"', {(W, "server.no_scheme")}),
        ("push = true", {(W, "key.unknown")}),
        ('[host."https://m.example"]\nserver = "https://x"', {(W, "key.unknown")}),
        ('[host."https://m.example"]\nskip_verify = "no"', {(E, "skip_verify.type")}),
        ('[host.""]\ncapabilities = ["pull"]', {(E, "host.invalid")}),
        ("[host]\n", set()),
        ("host = []", {(E, "host.type")}),
        ("[[host]]\n", {(E, "host.type")}),
    ],
)
def test_rules(text: str, expected: set[Any]) -> None:
    assert codes(check(text + "\n")) == expected


def test_several_findings_in_one_file_with_lines() -> None:
    text = (
        'server = "registry.example"\n'  # 1
        "\n"  # 2
        '[host."https://a.example"]\n'  # 3
        '  capabilities = "pull"\n'  # 4
        "  skip-verify = true\n"  # 5
        "\n"  # 6
        "[host.'https://b.example']\n"  # 7
        "  capabilities = ['pull', 'bogus']\n"  # 8
        "  [host.'https://b.example'.header]\n"  # 9
        "    X = 1\n"  # 10
    )
    found = [(f.line, f.severity, f.code) for f in check(text)]
    assert found == [
        (1, W, "server.no_scheme"),
        (4, E, "capabilities.type"),
        (5, W, "key.unknown"),
        (8, E, "capabilities.unknown"),
        (9, E, "header.type"),
    ]


def test_syntax_error_line() -> None:
    [finding] = check('server = "x"\n\n[host."a"\n')
    assert (finding.line, finding.code) == (3, "toml.syntax")


def test_unknown_key_hints() -> None:
    [typo] = check('[host."https://m.example"]\nskip-verify = true\n')
    assert "skip_verify" in typo.message and typo.line == 2
    [rewrite] = check(corpus_text("ignored_k3s_rewrite.toml"))
    assert "k3s" in rewrite.message


def test_ca_and_client_paths_resolve_against_file_dir_and_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    d = root / "etc" / "containerd" / "certs.d" / "ghcr.io"
    d.mkdir(parents=True)
    (d / "ca.crt").write_text(pki.EC_CERT)
    (root / "etc" / "ssl").mkdir(parents=True)
    (root / "etc" / "ssl" / "c.pem").write_text(pki.EC_CERT + pki.EC_KEY)
    text = 'ca = ["ca.crt", "sub/missing.crt"]\nclient = ["/etc/ssl/c.pem", ["/etc/ssl/c.pem", "k.key"]]\n'
    findings = validate_text(text, display_path="x", file_dir=d, root=root)
    assert [(f.code, f.line) for f in findings] == [("ca.missing", 1), ("client.missing", 2)]
    assert "sub/missing.crt" in findings[0].message and "k.key" in findings[1].message
    assert validate_text(text, display_path="x", file_dir=None) == []


def test_ca_naming_a_directory_is_missing(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    assert codes(check('ca = "certs"\n', file_dir=tmp_path)) == {(E, "ca.missing")}


# ---------------------------------------------------------------- secrets


def test_header_values_never_in_findings() -> None:
    secret = "Basic c3VwZXI6c2VjcmV0LXZhbHVl"
    texts = [
        f'header = "Authorization: {secret}"\n',
        f"header = {{ Authorization = ['{secret}', 3] }}\n",
        f'[host."https://m.example"]\nheader = "{secret}"\n',
        f'[host."https://m.example".header]\nAuthorization = ["{secret}", {{ a = 1 }}]\n',
        f'[host."https://m.example"]\nheader = {{ Authorization = "{secret}" }}\nbogus = 1\ncapabilities = "x"\n',
        f'[host."https://m.example"]\nheader = {{ Authorization = "{secret}" }}\n[host."https://m.example"]\n',
        corpus_text("accept_person_with_ca_and_header.toml").replace(
            "SECRET-TOKEN-do-not-print", secret
        ),
    ]
    for text in texts:
        for version in (None, (1, 6, 20)):
            findings = check(text, version, Path("/nonexistent"))
            assert findings, text
            assert secret not in str(findings)


def test_user_info_in_urls_is_redacted() -> None:
    text = '[host."https://bob:hunter2@m.example"]\ncapabilities = "pull"\n[host."https://bob:hunter2@m.example"]\n'
    assert "hunter2" not in str(check(text))
    text = '[host."bob:hunter2@m.example"]\nca = 1\nweird = 2\n'
    findings = check(text)
    assert codes(findings) == {(W, "host.no_scheme"), (E, "ca.type"), (W, "key.unknown")}
    assert "hunter2" not in str(findings)


# ---------------------------------------------------------------- bytes, sizes, files


def test_not_utf8() -> None:
    [finding] = check(b'server = "x"\n# \xff\xfe\n')
    assert (finding.severity, finding.code, finding.line) == (E, "file.not_utf8", 2)


def test_too_large_text_and_file(tmp_path: Path) -> None:
    big = b"# " + b"x" * MAX_BYTES + b"\n"
    assert codes(check(big)) == {(E, "file.too_large")}
    f = tmp_path / "hosts.toml"
    f.write_bytes(big)
    assert codes(validate_file(f, display_path="f")) == {(E, "file.too_large")}
    f.write_bytes(b"#" * (MAX_BYTES - 1) + b"\n")
    assert validate_file(f, display_path="f") == []


def test_unreadable_files(tmp_path: Path) -> None:
    assert codes(validate_file(tmp_path / "nope.toml", display_path="n")) == {
        (E, "file.unreadable")
    }
    assert codes(validate_file(tmp_path, display_path="d")) == {(E, "file.unreadable")}
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    [finding] = validate_file(fifo, display_path="/x/hosts.toml")
    assert (finding.code, finding.path) == ("file.unreadable", "/x/hosts.toml")


def test_validate_file_resolves_ca_next_to_file(tmp_path: Path) -> None:
    f = tmp_path / "hosts.toml"
    f.write_text('ca = "ca.crt"\n')
    assert codes(validate_file(f, display_path="f")) == {(E, "ca.missing")}
    (tmp_path / "ca.crt").write_text(pki.RSA_CERT)
    assert validate_file(f, display_path="f") == []


def test_dotted_keys_too_deep_to_parse_quickly() -> None:
    assert codes(check("a." * 20_000 + "a = 1")) == {(E, "file.too_complex")}
    assert codes(check("[" + "a." * 20_000 + "a]")) == {(E, "file.too_complex")}
    assert codes(check("[" + "a." * 100 + "a]")) == {(W, "key.unknown")}


def test_findings_are_capped_per_file() -> None:
    text = "".join(f'[host."https://h{i}.example"]\nca = 1\n' for i in range(300))
    findings = check(text)
    assert len(findings) == 101
    assert findings[-1].code == "file.truncated" and "200 more" in findings[-1].message
    assert findings[99].line == 200


def test_lines_of_inline_and_dotted_hosts() -> None:
    text = '[host]\n"https://a.example" = { capabilities = "pull" }\n"https://b.example".ca = 1\n'
    assert [(f.line, f.code) for f in check(text)] == [(2, "capabilities.type"), (3, "ca.type")]


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 100_000,
        "a = " + "[" * 3000 + "]" * 3000,
        "a = " + "{b = " * 3000 + "1" + "}" * 3000,
        "." * 10_000,
        "[" + "a." * 20_000 + "a]",
        "a." * 20_000 + "a = 1",
        "\x00",
        "\ufeffserver = 'x'",
    ],
)
def test_pathological_text_never_raises(text: str) -> None:
    findings = check(text)
    assert all(isinstance(f, Finding) for f in findings)


# ---------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.6.20", (1, 6, 20)),
        ("v2.1.4", (2, 1, 4)),
        ("2.0.0-rc.1", (2, 0, 0)),
        (" 1.7.22\n", (1, 7, 22)),
        ("1.6.20~ds1", (1, 6, 20)),
        ("2.1", (2, 1, 0)),
        ("1.7.0+unknown", (1, 7, 0)),
    ],
)
def test_parse_containerd_version(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_containerd_version(text) == expected


@pytest.mark.parametrize("text", ["", "junk", "1", "v", "1.x.2", "1.2.3.4", "containerd 1.6.20"])
def test_parse_containerd_version_junk(text: str) -> None:
    with pytest.raises(BadInput, match="containerd version"):
        parse_containerd_version(text)


# ---------------------------------------------------------------- a hosts dir


def make_hosts_dir(tmp_path: Path, layout: dict[str, str | None]) -> Path:
    hosts = tmp_path / "certs.d"
    hosts.mkdir()
    for name, content in layout.items():
        (hosts / name).mkdir()
        if content is not None:
            (hosts / name / "hosts.toml").write_text(content)
    return hosts


def display_under(base: Path) -> Any:
    return lambda p: "/etc/containerd/certs.d" + str(p)[len(str(base)) :]


def test_hosts_dir_rules(tmp_path: Path) -> None:
    hosts = make_hosts_dir(
        tmp_path,
        {
            "_default": corpus_text("accept_spegel_init_default.toml"),
            "docker.io": corpus_text("accept_spegel_written.toml"),
            "ghcr.io": None,  # empty: hides _default
            "127.0.0.1_5000_": corpus_text("accept_microk8s_docker_io.toml"),
            "127.0.0.1:5000": 'capabilities = "pull"\n',  # shadowed: still checked
            "quay.io": corpus_text("reject_capability_string.toml"),
            "_backup": "this is not TOML",
        },
    )
    (hosts / "stray-file").write_text("not a dir")
    findings = validate_hosts_dir(
        hosts, display=display_under(hosts), containerd_version=(1, 6, 20)
    )
    got = {(f.path, f.severity, f.code) for f in findings}
    base = "/etc/containerd/certs.d"
    assert got == {
        (f"{base}/127.0.0.1:5000", W, "dir.shadowed"),
        (f"{base}/127.0.0.1:5000/hosts.toml", E, "capabilities.type"),
        (f"{base}/127.0.0.1:5000/hosts.toml", E, "host.missing"),  # 1.6.20 needs a [host]
        (f"{base}/_default/hosts.toml", W, "dial_timeout.ignored"),
        (f"{base}/docker.io/hosts.toml", W, "dial_timeout.ignored"),
        (f"{base}/ghcr.io", W, "dir.hides_default"),
        (f"{base}/quay.io/hosts.toml", E, "capabilities.type"),
    }
    shadow = next(f for f in findings if f.code == "dir.shadowed")
    assert "127.0.0.1_5000_" in shadow.message


def test_hosts_dir_without_default(tmp_path: Path) -> None:
    hosts = make_hosts_dir(tmp_path, {"docker.io": None, "[::1]_5000_": None, "[::1]:5000": None})
    findings = validate_hosts_dir(hosts, display=str)
    got = sorted((Path(f.path).name, f.code) for f in findings)
    assert got == [
        ("[::1]:5000", "dir.no_hosts_toml"),
        ("[::1]:5000", "dir.shadowed"),
        ("[::1]_5000_", "dir.no_hosts_toml"),
        ("docker.io", "dir.no_hosts_toml"),
    ]


def test_hosts_dir_unreadable(tmp_path: Path) -> None:
    [finding] = validate_hosts_dir(tmp_path / "missing", display=str)
    assert (finding.severity, finding.code) == (E, "dir.unreadable")


def test_hosts_dir_ca_relative_to_each_dir(tmp_path: Path) -> None:
    hosts = make_hosts_dir(
        tmp_path, {"a.example": 'ca = "ca.crt"\n', "b.example": 'ca = "ca.crt"\n'}
    )
    (hosts / "a.example" / "ca.crt").write_text(pki.EC_CERT)
    findings = validate_hosts_dir(hosts, display=str)
    assert [(Path(f.path).parent.name, f.code) for f in findings] == [("b.example", "ca.missing")]


# ---------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_validate_text_never_raises_on_text(text: str) -> None:
    for f in check(text, (1, 7, 0)):
        assert isinstance(f, Finding) and "\n" not in f.message


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_validate_text_never_raises_on_bytes(data: bytes) -> None:
    check(data)


_KEY_NAMES = st.sampled_from(
    [
        "server",
        "host",
        "capabilities",
        "ca",
        "client",
        "header",
        "skip_verify",
        "override_path",
        "dial_timeout",
        "http://10.0.0.5:29999",
        "127.0.0.1:5000",
        "x y",
        "Authorization",
    ]
)
_SCALARS = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["pull", "resolve", "push", "referrers", "200ms", "1", "https://r.example"]),
    st.integers(),
    st.booleans(),
    st.floats(),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEY_NAMES, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(_KEY_NAMES, _VALUES, max_size=6), st.sampled_from([None, (1, 6, 20), (2, 2, 0)])
)
def test_validate_text_never_raises_on_toml_documents(
    doc: dict[str, Any], version: tuple[int, int, int] | None
) -> None:
    try:
        text = tomlkit.dumps(doc)
    except Exception:  # tomlkit cannot render some mixes (e.g. tables inside arrays of scalars)
        assume(False)
        return
    findings = check(text, version, Path("/nonexistent"))
    for f in findings:
        assert f.severity in (ERROR, WARNING) and f.code and "\n" not in f.message

"""Bad input: exit 2, one line on stderr naming what is wrong, no traceback, nothing written.

Every case runs through the real CLI entry (`main([...])` in-process); a sample also runs through
the installed console script in a subprocess, for the real exit status.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from support.cli import run_cli, tree_state
from support.faults import CONFIG, console, make_node, one_line_error

from spegel_node.cli import app

# (config file text or bytes, what stderr must name)
BAD_CONFIGS: list[tuple[str | bytes, str]] = [
    ("registries = [", "is not valid TOML"),
    ("registries = ['https://docker.io'", "is not valid TOML"),
    ("node_ip = 10.0.0.5", "is not valid TOML"),
    ("host_port = 1\nhost_port = 2", "is not valid TOML"),
    (b"registries = []\n# \xff\xfe", "is not UTF-8"),
    (b"\x00\x01\x02binary", "is not valid TOML"),
    ("a = " + "[" * 10_000 + "]" * 10_000, "nested too deeply"),
    ("a = " + "{b = " * 5_000 + "1" + "}" * 5_000, "nested too deeply"),
    ("regsitries = []", "unknown config key 'regsitries'"),
    ("[registry]\nurl = 'https://docker.io'", "unknown config key 'registry'"),
    ("Host_Port = 29999", "unknown config key 'Host_Port'"),
    ('registries = "https://docker.io"', "'registries' must be a list"),
    ('host_port = "29999"', "'host_port' must be an integer"),
    ("host_port = true", "'host_port' must be an integer"),
    ("host_port = 29999.0", "'host_port' must be an integer"),
    ("resolve_tags = 'yes'", "'resolve_tags' must be true or false"),
    ("resolve_tags = 1", "'resolve_tags' must be true or false"),
    ("node_ip = 5", "'node_ip' must be a string"),
    ("extra_mirrors = 'http://10.0.0.5:30021'", "'extra_mirrors' must be a list"),
    ("dial_timeout = 200", "'dial_timeout' must be a string"),
    ("gate_failures = '3'", "'gate_failures' must be an integer"),
    ("hosts_dir = ['/etc/containerd/certs.d']", "'hosts_dir' must be a string"),
    ("containerd_socket = false", "'containerd_socket' must be a string"),
    ("[containerd_config]\npath = '/x'", "'containerd_config' must be a string"),
    ("host_port = 0", "'host_port' must be from 1 to 65535"),
    ("host_port = 65536", "'host_port' must be from 1 to 65535"),
    ("host_port = -1", "'host_port' must be from 1 to 65535"),
    ("host_port = 99999999999999999999", "'host_port' must be from 1 to 65535"),
    ("gate_failures = 0", "'gate_failures' must be from 1 to 1000"),
    ("node_ip = '10.0.0.300'", "'node_ip' must be"),
    ("node_ip = 'node-1.example'", "'node_ip' must be"),
    ("dial_timeout = '1'", "'dial_timeout' must be a Go duration"),
    ("dial_timeout = '200 ms'", "'dial_timeout' must be a Go duration"),
    ("hosts_dir = 'etc/containerd/certs.d'", "'hosts_dir' must be an absolute node path"),
    ("hosts_dir = '/etc/../../tmp'", "'hosts_dir' must be an absolute node path"),
    ('hosts_dir = "/etc/\\u0000x"', "'hosts_dir' must be an absolute node path"),
    ("containerd_config = '../config.toml'", "'containerd_config' must be an absolute node path"),
]

# Registries that are not `http(s)://host[:port]`: (value as a TOML string, what stderr names)
BAD_REGISTRIES: list[tuple[str, str]] = [
    ('"https://ghcr.io/v2"', "must not have a path"),
    ('"https://ghcr.io/org/repo"', "must not have a path"),
    ('"https://ghcr.io/.."', "must not have a path"),
    ('"https://ghcr.io?ns=docker.io"', "must not have a query"),
    ('"https://ghcr.io#x"', "must not have a query or fragment"),
    ('"https://ghcr.io?"', "must not have a query"),
    ('"https://user:pass@ghcr.io"', "must not carry user info"),
    ('"https://user@ghcr.io"', "must not carry user info"),
    ('"https://@ghcr.io"', "must not carry user info"),
    ('"https://.."', "host must not be empty, start with '.' or contain '..'"),
    ('"https://../etc"', "must not have a path"),
    ('"https://a..b"', "contain '..'"),
    ('"https://.hidden"', "start with '.'"),
    ('"https://"', "host must not be empty"),
    ('"https://a\\\\b"', "backslash"),
    ('"https://a/b"', "must not have a path"),
    ('"https://a%2fb"', "host must be a DNS name or IP address"),
    ('"https://a\\u0000b"', "NUL"),
    ('"https://a b"', "whitespace"),
    ('"https://a\\tb"', "whitespace"),
    ('"https://a\\nb"', "whitespace"),
    ('"ghcr.io"', "needs a scheme"),
    ('"//ghcr.io"', "needs a scheme"),
    ('"ftp://ghcr.io"', "scheme must be http or https"),
    ('"file:///etc/passwd"', "scheme must be http or https"),
    ('"https://ghcr.io:0"', "port must be a number from 1 to 65535"),
    ('"https://ghcr.io:65536"', "port must be a number from 1 to 65535"),
    ('"https://ghcr.io:http"', "port must be a number from 1 to 65535"),
    ('"https://[::1"', "invalid registry"),
    ('"https://[zz::1]:5000"', "invalid registry 'https://[zz::1]:5000'"),
    ('"https://[fe80::1%25eth0]:5000"', "not a valid IPv6 address"),
    ('"https://gh_cr.io"', "host must be a DNS name or IP address"),
    ('"https://-ghcr.io"', "host must be a DNS name or IP address"),
    ('"https://ДОКЕР.io"', "host must be a DNS name or IP address"),
    ('"https://x\\uff0fy"', "invalid registry"),
    ('"_default/.."', "needs a scheme"),
    # DNS: a label is at most 63 characters, a name at most 253; host:port names a directory
    (f'"https://{"a" * 64}.example.com"', "a DNS label is longer than 63 characters"),
    (f'"https://{"a." * 126}io"', "host name is 254 characters, more than DNS allows (253)"),
    (f'"https://{("a" * 63 + ".") * 3}{"a" * 61}:65535"', "longer than a directory name"),
    ("5", "must be a string"),
    ('["https://ghcr.io"]', "must be a string"),
]

BAD_MIRRORS: list[tuple[str, str]] = [
    ('"10.0.0.5:30021"', "invalid mirror URL '10.0.0.5:30021': needs a scheme"),
    ('"http://10.0.0.5:30021/v2"', "invalid mirror URL"),
    ('"http://u:p@10.0.0.5:30021"', "must not carry user info"),
    ('"http://:30021"', "host must not be empty"),
    (f'"http://{"m" * 64}.example:30021"', "a DNS label is longer than 63 characters"),
    (f'"http://{"m." * 127}io:30021"', "more than DNS allows (253)"),
]

BAD_OPTIONS: list[tuple[list[str], str]] = [
    (["apply", "--bogus"], "No such option: --bogus"),
    (["apply", "--dry-rn"], "No such option: --dry-rn"),
    (["apply", "extra"], "unexpected extra argument"),
    (["aplly"], "No such command 'aplly'"),
    (["apply", "--output", "yaml"], "Invalid value for '--output'"),
    (["apply", "--config"], "requires an argument"),
    (["apply", "--config", "/nonexistent/config.toml"], "config file /nonexistent/config.toml"),
    (["apply", "--hosts-dir", "etc/containerd/certs.d"], "'--hosts-dir' must be an absolute"),
    (["apply", "--hosts-dir", "/etc/containerd/../../tmp"], "'--hosts-dir' must be an absolute"),
    (["remove", "--containerd-config", "../x"], "'--containerd-config' must be an absolute"),
    (["validate", "--containerd-version", "banana"], "invalid containerd version 'banana'"),
    (["validate", "--containerd-version", "1.x"], "invalid containerd version '1.x'"),
    (["validate", "--containerd-version", "1.7.20; rm -rf /"], "invalid containerd version"),
    (["validate", "/no/such/hosts.toml"], "/no/such/hosts.toml: no such file or directory"),
    (["detect", "--output"], "requires an argument"),
    (["helm-values", "--bogus"], "No such option: --bogus"),
]


@pytest.fixture
def node(tmp_path: Path) -> Path:
    return make_node(tmp_path / "node")


def _expect_bad_input(
    capsys: pytest.CaptureFixture[str], root: Path, args: list[str], names: str
) -> None:
    before = tree_state(root)
    result = run_cli(capsys, *args[:1], "--root", str(root), *args[1:])
    assert result.code == 2, (args, result)
    line = one_line_error(result.err)
    assert names in line, (names, line)
    assert result.out == ""
    assert tree_state(root) == before  # nothing written: no hosts files, no state dir, no lock
    assert not (root / "var/lib/spegel-node").exists()


def _write_config(root: Path, text: str | bytes) -> None:
    path = root / CONFIG.lstrip("/")
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


@pytest.mark.parametrize(("text", "names"), BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_bad_config_is_exit_2_one_line_nothing_written(
    capsys: pytest.CaptureFixture[str], node: Path, text: str | bytes, names: str
) -> None:
    _write_config(node, text)
    _expect_bad_input(capsys, node, ["apply", "--no-gate"], names)


# every command the CLI has that reads the node's config (detect, apply, remove, validate, doctor,
# helm-values, ...); `completion` prints a shell script and reads nothing
ALL_COMMANDS = sorted(set(typer.main.get_command(app).commands) - {"completion"})  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_every_command_refuses_a_bad_config_the_same_way(
    capsys: pytest.CaptureFixture[str], node: Path, command: str
) -> None:
    _write_config(node, "host_port = 70000\n")
    _expect_bad_input(capsys, node, [command], "'host_port' must be from 1 to 65535")


@pytest.mark.parametrize(("value", "names"), BAD_REGISTRIES, ids=range(len(BAD_REGISTRIES)))
def test_bad_registry_is_exit_2(
    capsys: pytest.CaptureFixture[str], node: Path, value: str, names: str
) -> None:
    _write_config(node, f'registries = ["https://docker.io", {value}]\nnode_ip = "10.0.0.5"\n')
    _expect_bad_input(capsys, node, ["apply", "--no-gate"], names)


@pytest.mark.parametrize(("value", "names"), BAD_MIRRORS, ids=range(len(BAD_MIRRORS)))
def test_bad_extra_mirror_is_exit_2(
    capsys: pytest.CaptureFixture[str], node: Path, value: str, names: str
) -> None:
    _write_config(node, f'node_ip = "10.0.0.5"\nextra_mirrors = [{value}]\n')
    _expect_bad_input(capsys, node, ["apply", "--no-gate"], names)


@pytest.mark.parametrize(("args", "names"), BAD_OPTIONS, ids=range(len(BAD_OPTIONS)))
def test_bad_option_is_exit_2(
    capsys: pytest.CaptureFixture[str], node: Path, args: list[str], names: str
) -> None:
    _expect_bad_input(capsys, node, args, names)


def test_config_that_is_a_directory_or_unreadable_is_exit_2(
    capsys: pytest.CaptureFixture[str], node: Path, tmp_path: Path
) -> None:
    _expect_bad_input(capsys, node, ["apply", "--config", str(tmp_path)], "cannot read config")
    looping = tmp_path / "loop.toml"
    looping.symlink_to(looping)
    _expect_bad_input(capsys, node, ["apply", "--config", str(looping)], "cannot read config")


def test_missing_root_is_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = run_cli(capsys, "apply", "--root", str(tmp_path / "nope"))
    assert result.code == 2
    assert "is not a directory" in one_line_error(result.err)
    assert not (tmp_path / "nope").exists()


CONSOLE_CASES: list[tuple[str | None, list[str], str]] = [
    ("registries = [", ["apply"], "is not valid TOML"),
    ("a = " + "[" * 10_000 + "]" * 10_000, ["apply"], "nested too deeply"),
    ('registries = ["https://ghcr.io/../../etc"]', ["apply"], "must not have a path"),
    ('registries = ["https://u:p@ghcr.io"]', ["remove"], "must not carry user info"),
    ("bogus = 1", ["detect"], "unknown config key 'bogus'"),
    (None, ["apply", "--bogus"], "No such option"),
    (None, ["validate", "--containerd-version", "x"], "invalid containerd version"),
]


@pytest.mark.parametrize(("text", "args", "names"), CONSOLE_CASES, ids=range(len(CONSOLE_CASES)))
def test_console_script_exit_2_without_traceback(
    node: Path, text: str | None, args: list[str], names: str
) -> None:
    if text is not None:
        _write_config(node, text)
    before = tree_state(node)
    proc = console(node, *args)
    assert proc.returncode == 2, proc
    assert names in one_line_error(proc.stderr)
    assert proc.stdout == ""
    assert tree_state(node) == before


# --- hostile hosts.toml files: validate reports them, apply leaves them alone ------------------


def _huge_comments() -> bytes:
    line = b"# " + b"x" * 97 + b"\n"
    return b'server = "https://ghcr.io"\n' + line * (50 * 1024 * 1024 // len(line))


def _const(data: bytes) -> Callable[[], bytes]:
    return lambda: data


HOSTILE_FILES: dict[str, tuple[Callable[[], bytes], str, str]] = {
    # name: (content, validate finding code, what apply says about it); built when used
    "not_utf8": (_const(b'server = "x"\n# caf\xe9\n'), "file.not_utf8", "not UTF-8 text"),
    "binary": (_const(bytes(range(256)) * 64), "file.not_utf8", "not UTF-8 text"),
    "nul": (_const(b'server = "https://ghcr.io"\x00\n'), "toml.syntax", "not valid TOML"),
    "bom": (_const(b'\xef\xbb\xbfserver = "https://x"\n'), "toml.syntax", "not valid TOML"),
    "huge_50mb": (_huge_comments, "file.too_large", "larger than"),
    "huge_one_line": (lambda: b"# " + b"y" * (50 * 1024 * 1024), "file.too_large", "larger than"),
    "nested_arrays": (
        lambda: b"a = " + b"[" * 10_000 + b"]" * 10_000,
        "toml.syntax",
        "nested too deeply",
    ),
    "nested_tables": (
        lambda: b"a = " + b"{b = " * 10_000 + b"1" + b"}" * 10_000,
        "toml.syntax",
        "nested too deeply",
    ),
    "deep_header": (
        lambda: b"[" + b".".join([b"a"] * 10_000) + b"]\n",
        "file.too_complex",
        "dotted",
    ),
    "deep_dotted_key": (
        lambda: b".".join([b"k"] * 100_000) + b" = 1\n",
        "file.too_complex",
        "dotted",
    ),
    "host_array": (_const(b'[[host]]\nurl = "x"\n'), "host.type", "'host' is not a table"),
}


@pytest.fixture(scope="module")
def hostile_node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One node whose hosts dir holds every hostile file, each in its own registry dir."""
    root = make_node(tmp_path_factory.mktemp("hostile") / "node", registries=[])
    for name, (data, _, _) in HOSTILE_FILES.items():
        d = root / "etc/containerd/certs.d" / f"{name.replace('_', '-')}.example"
        d.mkdir(parents=True)
        (d / "hosts.toml").write_bytes(data())
    return root


@pytest.mark.parametrize("output", ["text", "json"])
def test_validate_reports_hostile_files_and_never_crashes(
    capsys: pytest.CaptureFixture[str], hostile_node: Path, output: str
) -> None:
    import json

    before = tree_state(hostile_node)
    result = run_cli(capsys, "validate", "--root", str(hostile_node), "--output", output)
    assert result.code == 1
    assert "Traceback" not in result.err
    assert result.err == ""
    if output == "json":
        found = {
            f["path"].split("/")[-2]: f["code"]
            for f in json.loads(result.out)["findings"]
            if f["severity"] == "error"
        }
    else:
        found = {
            line.split()[1].split("/")[-2]: line.split()[2]
            for line in result.out.splitlines()
            if line.startswith("error")
        }
    for name, (_, code, _) in HOSTILE_FILES.items():
        assert found.get(f"{name.replace('_', '-')}.example") == code, (name, found)
    assert tree_state(hostile_node) == before


@pytest.mark.parametrize("name", list(HOSTILE_FILES))
def test_validate_one_hostile_file_by_path(
    capsys: pytest.CaptureFixture[str], hostile_node: Path, name: str
) -> None:
    path = f"/etc/containerd/certs.d/{name.replace('_', '-')}.example/hosts.toml"
    result = run_cli(capsys, "validate", path, "--root", str(hostile_node), "--strict")
    assert result.code == 1
    assert HOSTILE_FILES[name][1] in result.out
    assert result.err == ""


@pytest.mark.parametrize("name", list(HOSTILE_FILES))
def test_apply_leaves_a_hostile_file_alone_and_says_why(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    make, _, says = HOSTILE_FILES[name]
    data = make()
    root = make_node(tmp_path / "node", registries=["https://docker.io", "https://ghcr.io"])
    ghcr = root / "etc/containerd/certs.d/ghcr.io/hosts.toml"
    ghcr.parent.mkdir(parents=True)
    ghcr.write_bytes(data)
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(root))
    assert result.code == 1
    assert "Traceback" not in result.err
    problems = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(problems) == 1, result.err
    assert problems[0].count("/etc/containerd/certs.d/ghcr.io/hosts.toml") == 1  # said once
    assert says in problems[0]
    assert ghcr.read_bytes() == data  # left alone, byte for byte
    assert (root / "etc/containerd/certs.d/docker.io/hosts.toml").exists()  # others still served
    # and remove leaves it alone too (apply never took ownership of it)
    result = run_cli(capsys, "remove", "--root", str(root))
    assert result.code == 0, result.err
    assert ghcr.read_bytes() == data

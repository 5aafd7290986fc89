from __future__ import annotations

from pathlib import Path

import pytest

from spegel_node.errors import BadInput
from spegel_node.node import Node
from spegel_node.settings import DEFAULT_REGISTRIES, load_settings, settings_from_mapping


def write_config(root: Path, text: str) -> Path:
    path = root / "etc/spegel-node/config.toml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_missing_default_config_means_defaults(tmp_path: Path) -> None:
    settings = load_settings(Node(tmp_path))
    assert [r.url for r in settings.registries] == list(DEFAULT_REGISTRIES)
    assert settings.host_port == 29999
    assert settings.capabilities == ("pull", "resolve")
    assert settings.dial_timeout == "200ms"
    assert settings.gate_failures == 3
    assert settings.source == "defaults"


def test_default_config_is_read_under_root(tmp_path: Path) -> None:
    write_config(
        tmp_path, 'registries = ["https://ghcr.io"]\nhost_port = 30020\nresolve_tags = false\n'
    )
    settings = load_settings(Node(tmp_path))
    assert [r.host for r in settings.registries] == ["ghcr.io"]
    assert settings.host_port == 30020
    assert settings.capabilities == ("pull",)
    assert settings.mirror_urls("10.0.0.5") == ("http://10.0.0.5:30020",)


def test_explicit_config_is_read_as_given_not_under_root(tmp_path: Path) -> None:
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text('node_ip = "10.1.2.3"\nextra_mirrors = ["http://10.1.2.3:30021"]\n')
    settings = load_settings(Node(tmp_path / "no-such-root"), cfg)
    assert settings.mirror_urls(settings.node_ip) == (
        "http://10.1.2.3:29999",
        "http://10.1.2.3:30021",
    )


@pytest.mark.parametrize("registries", ["[]", '["_default"]'])
def test_empty_registries_mean_default_mode(tmp_path: Path, registries: str) -> None:
    write_config(tmp_path, f"registries = {registries}\n")
    assert load_settings(Node(tmp_path)).default_mode


def test_flags_override_config(tmp_path: Path) -> None:
    write_config(tmp_path, 'hosts_dir = "/etc/containerd/certs.d"\n')
    settings = load_settings(
        Node(tmp_path), overrides={"hosts_dir": "/opt/hosts", "containerd_socket": None}
    )
    assert settings.hosts_dir == "/opt/hosts"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("registries = [", "not valid TOML"),
        ("bogus = 1", "'bogus'"),
        ('host_port = "29999"', "'host_port'"),
        ("host_port = true", "'host_port'"),
        ("host_port = 0", "'host_port'"),
        ("host_port = 70000", "'host_port'"),
        ('registries = "https://ghcr.io"', "'registries'"),
        ('registries = ["ghcr.io"]', "needs a scheme"),
        ('registries = ["https://ghcr.io/../../etc"]', "path"),
        ("registries = [1]", "must be a string"),
        ('node_ip = "not-an-ip"', "'node_ip'"),
        ('dial_timeout = "1"', "'dial_timeout'"),
        ("dial_timeout = 200", "'dial_timeout'"),
        ("resolve_tags = 1", "'resolve_tags'"),
        ("gate_failures = 0", "'gate_failures'"),
        ('extra_mirrors = ["http://x:1/path"]', "path"),
        ('hosts_dir = "relative/dir"', "'hosts_dir'"),
        ('hosts_dir = "/etc/../../x"', "'hosts_dir'"),
    ],
)
def test_bad_config_is_one_line_bad_input_naming_the_problem(
    tmp_path: Path, text: str, names: str
) -> None:
    write_config(tmp_path, text + "\n")
    with pytest.raises(BadInput) as exc:
        load_settings(Node(tmp_path))
    message = str(exc.value)
    assert names in message
    assert "\n" not in message


def test_non_utf8_and_missing_explicit_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe registries = []")
    with pytest.raises(BadInput, match="not UTF-8"):
        load_settings(Node(tmp_path), bad)
    with pytest.raises(BadInput, match="does not exist"):
        load_settings(Node(tmp_path), tmp_path / "missing.toml")


def test_duplicate_registries_collapse() -> None:
    settings = settings_from_mapping({"registries": ["https://ghcr.io", "https://GHCR.io/"]})
    assert len(settings.registries) == 1


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("x = " + "[" * 5_000 + "]" * 5_000, "nested too deeply"),
        ("a" + ".a" * 20_000 + " = 1", "too complex to parse safely"),
    ],
)
def test_hostile_config_is_refused_by_the_guarded_loader(
    tmp_path: Path, text: str, why: str
) -> None:
    write_config(tmp_path, text + "\n")
    with pytest.raises(BadInput, match=why) as exc:
        load_settings(Node(tmp_path))
    assert "\n" not in str(exc.value)


def test_a_one_line_list_of_5000_registries_is_not_too_complex(tmp_path: Path) -> None:
    urls = ", ".join(f'"https://r{i}.example.com"' for i in range(5000))
    write_config(tmp_path, f"registries = [{urls}]\n")
    assert len(load_settings(Node(tmp_path)).registries) == 5000

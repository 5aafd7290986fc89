from __future__ import annotations

import pytest

from spegel_node.errors import BadInput
from spegel_node.registry import Registry, parse_mirror_url, parse_registry, registry_for_host


@pytest.mark.parametrize(
    ("raw", "host", "dirs"),
    [
        ("https://ghcr.io", "ghcr.io", ("ghcr.io",)),
        ("https://GHCR.io/", "ghcr.io", ("ghcr.io",)),
        ("http://127.0.0.1:5000", "127.0.0.1:5000", ("127.0.0.1_5000_", "127.0.0.1:5000")),
        (
            "https://registry.example.com:8443",
            "registry.example.com:8443",
            ("registry.example.com_8443_", "registry.example.com:8443"),
        ),
        ("http://[::1]:5000", "[::1]:5000", ("[::1]_5000_", "[::1]:5000")),
    ],
)
def test_valid_registries_and_containerd_dir_lookup_order(
    raw: str, host: str, dirs: tuple[str, ...]
) -> None:
    # containerd's HostDirFromRoot tries `host_port_` before `host:port` (Talos writes the former).
    registry = parse_registry(raw)
    assert registry.host == host
    assert registry.dir_names == dirs


@pytest.mark.parametrize(
    "raw",
    [
        "ghcr.io",  # no scheme
        "ftp://ghcr.io",
        "https://ghcr.io/v2",  # path
        "https://ghcr.io/../../etc",
        "https://ghcr.io?x=1",
        "https://ghcr.io#frag",
        "https://user:pw@ghcr.io",
        "https://user@ghcr.io",
        "https://..",
        "https://../etc",
        "https://.hidden",
        "https://a..b",
        "https://gh\\cr.io",
        "https://ghcr.io\x00",
        "https://gh cr.io",
        "https://",
        "https://ghcr.io:0",
        "https://ghcr.io:99999",
        "https://ghcr.io:abc",
        "https://_default",
        "https://[::zz]:5000",
        "",
        42,
        None,
    ],
)
def test_invalid_registry_names_are_bad_input(raw: object) -> None:
    with pytest.raises(BadInput) as exc:
        parse_registry(raw)
    assert "\n" not in str(exc.value)


def test_docker_hub_upstream_is_registry_1() -> None:
    assert parse_registry("https://docker.io").upstream == "https://registry-1.docker.io"
    assert parse_registry("https://quay.io").upstream == "https://quay.io"


def test_mirror_url_and_dir_name_round_trip() -> None:
    assert parse_mirror_url("http://10.0.0.5:30021") == "http://10.0.0.5:30021"
    assert registry_for_host("127.0.0.1_5000_") == Registry("https", "127.0.0.1:5000")
    assert registry_for_host("docker.io").upstream == "https://registry-1.docker.io"


def test_longest_dns_name_is_accepted() -> None:
    host = ("a" * 63 + ".") * 3 + "a" * 61  # 253 characters, labels of 63
    assert parse_registry(f"https://{host}").host == host
    assert parse_registry(f"https://{host[:-6]}:65535").dir_names[-1] == f"{host[:-6]}:65535"

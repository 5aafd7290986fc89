"""The agent's settings: the config file (TOML) checked strictly, then the command-line overrides."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spegel_node import fsutil, tomlload
from spegel_node.errors import BadInput, denied_to_non_root, needs_root_hint
from spegel_node.godur import parse_go_duration
from spegel_node.node import DEFAULT_SETTINGS_PATH, Node
from spegel_node.registry import Registry, parse_mirror_url, parse_registry

DEFAULT_REGISTRIES = (
    "https://docker.io",
    "https://ghcr.io",
    "https://quay.io",
    "https://gcr.io",
    "https://registry.k8s.io",
)


@dataclass(frozen=True)
class Settings:
    registries: tuple[Registry, ...]  # empty: mirror every registry through `_default`
    host_port: int = 29999
    node_ip: str = "auto"
    extra_mirrors: tuple[str, ...] = ()
    resolve_tags: bool = True
    dial_timeout: str = "200ms"
    gate_failures: int = 3
    probe_interval: str = "10s"  # `run`: how often /v2/ is probed (backs off while withdrawn)
    hosts_dir: str = ""
    containerd_socket: str = ""
    containerd_config: str = ""
    source: str = field(default="defaults", compare=False)  # where the settings came from

    @property
    def default_mode(self) -> bool:
        return not self.registries

    @property
    def capabilities(self) -> tuple[str, ...]:
        return ("pull", "resolve") if self.resolve_tags else ("pull",)

    def mirror_url(self, node_ip: str) -> str:
        return f"http://{url_host(node_ip)}:{self.host_port}"

    def mirror_urls(self, node_ip: str) -> tuple[str, ...]:
        """The Spegel mirror URLs in the order hosts.toml lists them ({node_ip} filled in)."""
        first = self.mirror_url(node_ip)
        extra = (m.replace(NODE_IP_PLACEHOLDER, url_host(node_ip)) for m in self.extra_mirrors)
        return (first, *(m for m in extra if m != first))


NODE_IP_PLACEHOLDER = "{node_ip}"  # in extra_mirrors: the node IP the mirror URL uses
_PLACEHOLDER_HOST = "node-ip.spegel-node.invalid"  # stands in for it while the URL is checked


def url_host(ip: str) -> str:
    """An IP as a URL's host: IPv6 in brackets."""
    return f"[{ip}]" if ":" in ip else ip


def parse_extra_mirror(raw: object) -> str:
    """A mirror URL whose host may be `{node_ip}` (kept as the placeholder, filled in per node)."""
    if not isinstance(raw, str) or NODE_IP_PLACEHOLDER not in raw:
        if isinstance(raw, str) and "NODE_IP" in raw:
            raise BadInput(
                f"invalid mirror URL {raw!r} in extra_mirrors: write the node's address as "
                f'{NODE_IP_PLACEHOLDER}, e.g. "http://{NODE_IP_PLACEHOLDER}:30021"'
            )
        return parse_mirror_url(raw)
    text = raw.replace(f"[{NODE_IP_PLACEHOLDER}]", NODE_IP_PLACEHOLDER)
    try:
        url = parse_mirror_url(text.replace(NODE_IP_PLACEHOLDER, _PLACEHOLDER_HOST))
    except BadInput as e:
        raise BadInput(str(e).replace(_PLACEHOLDER_HOST, NODE_IP_PLACEHOLDER)) from e
    host_port = url.split("://", 1)[1]
    if host_port != _PLACEHOLDER_HOST and not host_port.startswith(_PLACEHOLDER_HOST + ":"):
        raise BadInput(
            f"invalid mirror URL {raw!r} in extra_mirrors: {NODE_IP_PLACEHOLDER} must be the "
            f'whole host, e.g. "http://{NODE_IP_PLACEHOLDER}:30021"'
        )
    return url.replace(_PLACEHOLDER_HOST, NODE_IP_PLACEHOLDER)


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "registries": list,
    "host_port": int,
    "node_ip": str,
    "extra_mirrors": list,
    "resolve_tags": bool,
    "dial_timeout": str,
    "gate_failures": int,
    "probe_interval": str,
    "hosts_dir": str,
    "containerd_socket": str,
    "containerd_config": str,
}
_TYPE_NAMES = {list: "a list", int: "an integer", str: "a string", bool: "true or false"}
PATH_KEYS = ("hosts_dir", "containerd_socket", "containerd_config")


def _check_type(key: str, value: Any) -> None:
    want = _FIELDS[key]
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok:
        raise BadInput(f"config key {key!r} must be {_TYPE_NAMES[want]}, got {value!r}")  # type: ignore[index]


def _check_node_path(key: str, value: str) -> str:
    if value and (not value.startswith("/") or "\x00" in value or ".." in value.split("/")):
        raise BadInput(
            f"config key {key!r} must be an absolute node path without '..', got {value!r}"
        )
    return value.rstrip("/") or ("/" if value else "")


def settings_from_mapping(data: dict[str, Any], source: str = "defaults") -> Settings:
    """Validate a parsed config mapping; every problem is BadInput naming the key."""
    for key in data:
        if key not in _FIELDS:
            known = ", ".join(_FIELDS)
            raise BadInput(f"unknown config key {key!r} in {source} (known keys: {known})")
    for key, value in data.items():
        _check_type(key, value)

    raw_registries = data.get("registries", list(DEFAULT_REGISTRIES))
    if raw_registries == ["_default"]:
        raw_registries = []
    registries = tuple(dict.fromkeys(parse_registry(r) for r in raw_registries))

    host_port = data.get("host_port", 29999)
    if not 1 <= host_port <= 65535:
        raise BadInput(f"config key 'host_port' must be from 1 to 65535, got {host_port}")

    node_ip = data.get("node_ip", "auto")
    if node_ip != "auto":
        try:
            if "%" in node_ip:  # containerd drops a hosts.toml whose host URL has a zone
                raise ValueError("IPv6 zone")
            node_ip = str(ipaddress.ip_address(node_ip))
        except ValueError as e:
            raise BadInput(
                f"config key 'node_ip' must be \"auto\" or an IP address, got {node_ip!r}"
            ) from e

    extra = data.get("extra_mirrors", [])
    extra_mirrors = tuple(parse_extra_mirror(m) for m in extra)

    dial_timeout = data.get("dial_timeout", "200ms")
    ns = parse_go_duration(dial_timeout) if isinstance(dial_timeout, str) else None
    if ns is None or ns <= 0:
        raise BadInput(
            "config key 'dial_timeout' must be a Go duration, positive and up to 2562047h, such as "
            f'"200ms", got {dial_timeout!r}'
        )
    gate_failures = data.get("gate_failures", 3)
    if not 1 <= gate_failures <= 1000:
        raise BadInput(f"config key 'gate_failures' must be from 1 to 1000, got {gate_failures}")

    probe_interval = data.get("probe_interval", "10s")
    ns = parse_go_duration(probe_interval) if isinstance(probe_interval, str) else None
    seconds = None if ns is None else ns / 1e9
    if seconds is None or not 0.1 <= seconds <= 3600:
        raise BadInput(
            "config key 'probe_interval' must be a Go duration from 100ms to 1h such as "
            f'"5s", got {probe_interval!r}'
        )

    paths = {k: _check_node_path(k, data.get(k, "")) for k in PATH_KEYS}
    return Settings(
        registries=registries,
        host_port=host_port,
        node_ip=node_ip,
        extra_mirrors=extra_mirrors,
        resolve_tags=data.get("resolve_tags", True),
        dial_timeout=dial_timeout,
        gate_failures=gate_failures,
        probe_interval=probe_interval,
        source=source,
        **paths,
    )


def _unreadable_config(source: str, err: OSError) -> BadInput:
    """SPEC: an unreadable config is bad input (exit 2); a non-root run is told it needs root."""
    hint = f": {needs_root_hint()}" if denied_to_non_root(err) else ""
    return BadInput(f"cannot read config file {source}: {err.strerror}{hint}")


def load_settings(
    node: Node, config: Path | None = None, overrides: dict[str, str | None] | None = None
) -> Settings:
    """Read `config` (as given) or the node's default config file (a missing default = defaults).

    `overrides` are the --hosts-dir/--containerd-socket/--containerd-config flags; a set flag wins.
    """
    path = config if config is not None else node.path(DEFAULT_SETTINGS_PATH)
    data: dict[str, Any] = {}
    source = "defaults"
    try:
        present = config is not None or path.exists()
    except OSError as e:  # the default's dir may not be searched: as unreadable as the file
        raise _unreadable_config(DEFAULT_SETTINGS_PATH, e) from e
    if present:
        source = str(config) if config is not None else DEFAULT_SETTINGS_PATH
        try:
            raw = fsutil.read_file(path, tomlload.MAX_BYTES)
        except FileNotFoundError as e:
            raise BadInput(f"config file {source} does not exist") from e
        except OSError as e:
            raise _unreadable_config(source, e) from e
        try:
            data = tomlload.loads(raw)
        except tomlload.LoadError as e:
            raise BadInput(f"config file {source} is {e}") from e
    settings = settings_from_mapping(data, source)
    flags = overrides or {}

    def flag(key: str, current: str) -> str:
        value = flags.get(key)
        return _check_node_path("--" + key.replace("_", "-"), value) if value else current

    return replace(
        settings,
        hosts_dir=flag("hosts_dir", settings.hosts_dir),
        containerd_socket=flag("containerd_socket", settings.containerd_socket),
        containerd_config=flag("containerd_config", settings.containerd_config),
    )

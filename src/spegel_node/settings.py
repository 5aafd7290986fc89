"""The agent's settings: the config file (TOML) checked strictly, then the command-line overrides."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spegel_node.compat import tomllib
from spegel_node.errors import BadInput
from spegel_node.node import DEFAULT_CONFIG, Node
from spegel_node.registry import Registry, parse_mirror_url, parse_registry

DEFAULT_REGISTRIES = (
    "https://docker.io",
    "https://ghcr.io",
    "https://quay.io",
    "https://gcr.io",
    "https://registry.k8s.io",
)
# Go's time.ParseDuration: one or more <number><unit>, e.g. "200ms", "1m30s".
_GO_MAX_NS = (1 << 63) - 1  # time.Duration is an int64 of nanoseconds
_UNIT_NS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def duration_ns(value: str) -> float | None:
    """A Go duration in nanoseconds (sign included); None when it is not one."""
    sign = -1.0 if value.startswith("-") else 1.0
    body = value.lstrip("+-")
    if body == "0":
        return 0.0
    parts = _DURATION_PART.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        return None
    return sign * sum(float(n) * _UNIT_NS[u] for n, u in parts)


GO_DURATION = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+$|^0$")


@dataclass(frozen=True)
class Settings:
    registries: tuple[Registry, ...]  # empty: mirror every registry through `_default`
    host_port: int = 29999
    node_ip: str = "auto"
    extra_mirrors: tuple[str, ...] = ()
    resolve_tags: bool = True
    dial_timeout: str = "200ms"
    gate_failures: int = 3
    probe_interval: str = "5s"  # `run`: how often /v2/ is probed (backs off while withdrawn)
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
        host = f"[{node_ip}]" if ":" in node_ip else node_ip
        return f"http://{host}:{self.host_port}"

    def mirror_urls(self, node_ip: str) -> tuple[str, ...]:
        """The Spegel mirror URLs in the order hosts.toml lists them."""
        first = self.mirror_url(node_ip)
        return (first, *(m for m in self.extra_mirrors if m != first))


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
    extra_mirrors = tuple(parse_mirror_url(m) for m in extra)

    dial_timeout = data.get("dial_timeout", "200ms")
    ns = duration_ns(dial_timeout) if GO_DURATION.match(dial_timeout) else None
    if ns is None or not 0 < ns <= _GO_MAX_NS:
        raise BadInput(
            "config key 'dial_timeout' must be a Go duration, positive and up to 2562047h, such as "
            f'"200ms", got {dial_timeout!r}'
        )
    gate_failures = data.get("gate_failures", 3)
    if not 1 <= gate_failures <= 1000:
        raise BadInput(f"config key 'gate_failures' must be from 1 to 1000, got {gate_failures}")

    probe_interval = data.get("probe_interval", "5s")
    seconds = go_duration_seconds(probe_interval) if GO_DURATION.match(probe_interval) else None
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


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def go_duration_seconds(value: str) -> float:
    """A Go duration (already matched by GO_DURATION) in seconds: "1m30s" -> 90.0."""
    sign = -1.0 if value.startswith("-") else 1.0
    total = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))
    return sign * total


def load_settings(
    node: Node, config: Path | None = None, overrides: dict[str, str | None] | None = None
) -> Settings:
    """Read `config` (as given) or the node's default config file (a missing default = defaults).

    `overrides` are the --hosts-dir/--containerd-socket/--containerd-config flags; a set flag wins.
    """
    path = config if config is not None else node.path(DEFAULT_CONFIG)
    data: dict[str, Any] = {}
    source = "defaults"
    if config is not None or path.exists():
        source = str(config) if config is not None else DEFAULT_CONFIG
        try:
            raw = path.read_bytes()
        except FileNotFoundError as e:
            raise BadInput(f"config file {source} does not exist") from e
        except OSError as e:
            raise BadInput(f"cannot read config file {source}: {e.strerror}") from e
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadInput(f"config file {source} is not UTF-8 text") from e
        except tomllib.TOMLDecodeError as e:
            raise BadInput(f"config file {source} is not valid TOML: {e}") from e
        except RecursionError as e:
            raise BadInput(f"config file {source} is not valid TOML: nested too deeply") from e
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


def resolve_node_ip(settings: Settings) -> str:
    """The configured node IP, or with "auto" this machine's primary IPv4 (default route's interface)."""
    if settings.node_ip != "auto":
        return settings.node_ip
    return primary_ipv4()


def primary_ipv4() -> str:
    iface = _default_route_interface()
    import psutil  # only needed for "auto"

    addrs = psutil.net_if_addrs()
    candidates = [iface] if iface else []
    candidates += [name for name in addrs if name != iface]
    for name in candidates:
        for addr in addrs.get(name, []):
            if addr.family.name == "AF_INET" and not addr.address.startswith("127."):
                return str(addr.address)
    return "127.0.0.1"


def _default_route_interface() -> str | None:
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return fields[0]
    return None

"""What containerd's answers and settings mean, pure: the running CRI config (CRI status or
`crictl info` JSON), which value of a setting is in effect, and which hosts dirs it searches.

doctor's Facts gathers the raw answers; the rules here turn them into the facts checks read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spegel_node import tomlload
from spegel_node.containerd_config import ContainerdConfig
from spegel_node.errors import SpegelNodeError
from spegel_node.hostsdir_rules import DEFAULT_CONFIG_PATH, DEFAULT_CONFIG_PATH_SINCE
from spegel_node.layout import Layout
from spegel_node.validate import Version, parse_containerd_version

CRI_KEYS = ("config_path", "discard_unpacked_layers", "use_local_image_pull")


@dataclass(frozen=True)
class ContainerdVersion:
    version: Version | None
    text: str  # as reported, e.g. "1.6.20~ds1"; "" when unknown
    source: str  # "the running containerd", "/usr/bin/containerd --version"; why unknown

    def at_least(self, minimum: Version) -> bool | None:
        """None when the version is unknown."""
        return None if self.version is None else self.version >= minimum


@dataclass(frozen=True)
class LiveConfig:
    """The CRI config the running containerd uses (CRI Status `info.config`)."""

    config_path: str | None  # "" = explicitly unset
    discard_unpacked_layers: bool | None
    use_local_image_pull: bool | None
    source: str


@dataclass(frozen=True)
class Setting:
    """One CRI setting: the running value wins over the file's."""

    value: Any  # effective value; None = set nowhere we can see
    source: str  # where `value` comes from
    file_value: Any = None
    live_value: Any = None
    live_known: bool = False

    @property
    def restart_pending(self) -> bool:
        """The file says something else than the running containerd uses."""
        return (
            self.live_known and self.file_value is not None and self.file_value != self.live_value
        )


@dataclass(frozen=True)
class HostsRoots:
    roots: tuple[str, ...]  # node paths, containerd's search order
    source: str
    read_by_containerd: bool | None  # False: config_path unset; None: cannot tell


def effective_setting(
    key: str,
    config: ContainerdConfig | None,
    live: LiveConfig | None,
    version: ContainerdVersion,
) -> Setting:
    """One of CRI_KEYS as containerd uses it: the running value wins over the file's."""
    file_value = getattr(config, key) if config is not None else None
    if file_value == "":
        file_value = None
    where = config.path if config is not None else "no config file"
    if live is not None:
        live_value = getattr(live, key)
        if live_value == "":
            live_value = None
        # An empty live config_path means "none" only on 1.x: 2.x's CRI status does not carry
        # the images plugin's registry settings (2.1.9 reports an empty configPath there).
        empty_is_none = version.at_least((2, 0, 0)) is not True
        if live_value is not None or (key == "config_path" and empty_is_none):
            return Setting(live_value, live.source, file_value, live_value, True)
    return Setting(file_value, where, file_value, None, False)


def hosts_roots(
    config_path: Setting, version: ContainerdVersion, layout: Layout | None, hosts_dir: str
) -> HostsRoots:
    """The hosts dirs containerd searches, in order, and whether it reads them at all."""
    if config_path.value:
        roots = tuple(p for p in str(config_path.value).split(":") if p)
        return HostsRoots(roots, f"from {config_path.source}", True)
    if version.at_least(DEFAULT_CONFIG_PATH_SINCE):
        return HostsRoots(DEFAULT_CONFIG_PATH, "containerd 2.2+ default config_path", True)
    if layout is not None and layout.config is None and layout.config_path_set:
        return HostsRoots(layout.hosts_dirs, f"{layout.flavor} default (not confirmed)", None)
    return HostsRoots((hosts_dir,), "config_path unset", False)


def version_of(text: str, source: str) -> ContainerdVersion:
    try:
        return ContainerdVersion(parse_containerd_version(text), text.lstrip("v"), source)
    except SpegelNodeError:
        return ContainerdVersion(None, text, f"{source} (unparseable version {text!r})")


def _find(data: Any, key: str, depth: int = 2) -> Any:
    """`key` in a dict or in its nested dicts, shallowest first."""
    if not isinstance(data, dict):
        return None
    if key in data:
        return data[key]
    if depth == 0:
        return None
    for value in data.values():
        found = _find(value, key, depth - 1)
        if found is not None:
            return found
    return None


def parse_live_config(raw: str, source: str) -> LiveConfig | None:
    """The CRI config in CRI status `info.config` (JSON text); None when it is not readable."""
    try:
        config = tomlload.loads_json(raw)
    except tomlload.LoadError:
        return None
    return _live_config_of(config, source) if isinstance(config, dict) else None


def _live_config_of(config: dict[str, Any], source: str) -> LiveConfig:
    registry = config.get("registry")
    config_path = registry.get("configPath") if isinstance(registry, dict) else None
    containerd = config.get("containerd")
    discard = containerd.get("discardUnpackedLayers") if isinstance(containerd, dict) else None
    if discard is None:
        discard = _find(config, "discardUnpackedLayers")
    local = _find(config, "useLocalImagePull")
    return LiveConfig(
        config_path if isinstance(config_path, str) else None,
        discard if isinstance(discard, bool) else None,
        local if isinstance(local, bool) else None,
        source,
    )


def parse_crictl_info(stdout: str, binary: str) -> LiveConfig | None:
    """The CRI config in `crictl info`'s JSON (an object, or a JSON string on some versions)."""
    try:
        info = tomlload.loads_json(stdout)
    except tomlload.LoadError:
        return None
    config = info.get("config") if isinstance(info, dict) else None
    if isinstance(config, dict):
        return _live_config_of(config, f"`{binary} info`")
    if isinstance(config, str):
        return parse_live_config(config, f"`{binary} info`")
    return None

"""Everything doctor reads from the node, gathered lazily, once, and shared by the checks.

Checks run on their own threads and ask for what they need; each fact is computed by the first
check that asks (the others wait for it) and cached. All of it is read-only: nothing here
creates, locks or writes anything on the node. Programs (`containerd --version`, `crictl info`,
`systemctl`) only run when the root is this machine's own `/` (`live`).
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from spegel_node import state
from spegel_node.containerd_config import (
    ContainerdConfig,
    ContainerdConfigError,
    read_containerd_config,
)
from spegel_node.doctor import cri
from spegel_node.doctor.imageref import ImageRef
from spegel_node.doctor.probes import HttpResult, RunResult, http_request, run_program
from spegel_node.errors import SpegelNodeError
from spegel_node.flavors import COMMON_CONTAINERD, COMMON_CRICTL, FALLBACK_HOSTS_DIR
from spegel_node.flavors import flavor as flavor_record
from spegel_node.layout import ContainerdProcess, Layout, detect, running_containerd
from spegel_node.node import Node
from spegel_node.registry import DEFAULT_DIR, Registry, registry_for_host
from spegel_node.settings import Settings, resolve_node_ip
from spegel_node.validate import Version, parse_containerd_version

T = TypeVar("T")

DEFAULT_CONFIG_PATH_SINCE: Version = (2, 2, 0)  # containerd's own default config_path (Linux)
DEFAULT_CONFIG_PATH = ("/etc/containerd/certs.d", "/etc/docker/certs.d")
MAX_FILE = 1 << 20


@dataclass(frozen=True)
class Timeouts:
    socket_s: float = 1.0  # containerd socket: connect + Version + CRI Status
    mirror_s: float = 1.5  # Spegel /v2/ and the --image HEAD
    hint_s: float = 0.8  # /v2/ on the chart's default hostPort, only when the mirror is dead
    optional_s: float = 1.0  # /readyz, metrics
    program_s: float = 1.0  # containerd --version, crictl info, systemctl
    deadline_s: float = 4.5  # the whole run


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


@dataclass(frozen=True)
class HostsTarget:
    """A registry whose pulls should go through Spegel, and the dirs containerd looks up for it."""

    name: str  # check id suffix: "docker.io", "127.0.0.1:5000", "_default"
    registry: Registry | None  # None for `_default`
    dir_names: tuple[str, ...]  # lookup order, `_default` last

    @property
    def label(self) -> str:
        return "every registry (_default)" if self.registry is None else self.name


@dataclass(frozen=True)
class Found:
    """The directory containerd reads for a target."""

    root: str
    name: str

    @property
    def dir(self) -> str:
        return posixpath.join(self.root, self.name)

    @property
    def hosts_toml(self) -> str:
        return posixpath.join(self.root, self.name, "hosts.toml")


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: bool = False
    value: Any = None
    error: BaseException | None = None


class Facts:
    def __init__(
        self,
        node: Node,
        settings: Settings,
        *,
        image: ImageRef | None = None,
        live: bool | None = None,
        timeouts: Timeouts | None = None,
        containerd_binaries: Sequence[str] | None = None,
        crictl_binaries: Sequence[str] | None = None,
        processes: Sequence[ContainerdProcess] | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.settings = settings
        self.image = image
        self.live = node.is_live if live is None else live
        self.timeouts = timeouts or Timeouts()
        self.now = now
        self._containerd_binaries = containerd_binaries
        self._crictl_binaries = crictl_binaries
        self._processes = processes
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    def _once(self, key: str, compute: Callable[[], T]) -> T:
        with self._lock:
            slot = self._slots.setdefault(key, _Slot())
        with slot.lock:
            if not slot.done:
                try:
                    slot.value = compute()
                except BaseException as e:
                    slot.error = e
                slot.done = True
        if slot.error is not None:
            raise slot.error
        return slot.value  # type: ignore[no-any-return]

    # ------------------------------------------------------------ layout and config

    def _detect(self) -> tuple[Layout | None, str]:
        s = self.settings
        try:
            layout = detect(
                self.node,
                hosts_dir=s.hosts_dir,
                containerd_socket=s.containerd_socket,
                containerd_config=s.containerd_config,
                processes=self.processes if self.live else [],
            )
        except SpegelNodeError as e:
            return None, str(e)
        return layout, ""

    @property
    def layout(self) -> Layout | None:
        return self._once("layout", self._detect)[0]

    @property
    def layout_error(self) -> str:
        return self._once("layout", self._detect)[1]

    @property
    def flavor(self) -> str | None:
        return self.layout.flavor if self.layout else None

    @property
    def processes(self) -> list[ContainerdProcess]:
        """Running containerd daemons (live roots only)."""

        def find() -> list[ContainerdProcess]:
            if self._processes is not None:
                return list(self._processes)
            return running_containerd() if self.live else []

        return self._once("processes", find)

    @property
    def config(self) -> ContainerdConfig | None:
        return self.layout.config if self.layout else None

    @property
    def config_error(self) -> str:
        """Why the containerd config could not be read ("" when it was, or there is none)."""

        def read() -> str:
            layout = self.layout
            if layout is None or layout.config is not None or not layout.containerd_config:
                return ""
            if not self.node.path(layout.containerd_config).exists():
                return ""
            try:
                read_containerd_config(self.node, layout.containerd_config)
            except ContainerdConfigError as e:
                return str(e)
            return ""

        return self._once("config_error", read)

    @property
    def hosts_dir(self) -> str:
        """The hosts dir spegel-node writes (the first config_path root, or the override)."""
        layout = self.layout
        if layout is not None and layout.hosts_dir:
            return layout.hosts_dir
        return self.settings.hosts_dir or FALLBACK_HOSTS_DIR

    # ------------------------------------------------------------ the mirror

    @property
    def node_ip(self) -> str:
        return self._once("node_ip", lambda: resolve_node_ip(self.settings))

    @property
    def mirror_urls(self) -> tuple[str, ...]:
        return self.settings.mirror_urls(self.node_ip)

    @property
    def mirror_url(self) -> str:
        return self.mirror_urls[0]

    def http(
        self,
        url: str,
        *,
        timeout: float,
        method: str = "GET",
        headers: dict[str, str] | None = None,
    ) -> HttpResult:
        """One request per (method, URL) per run, whoever asks first."""
        return self._once(
            f"http {method} {url}",
            lambda: http_request(url, method=method, timeout=timeout, headers=headers),
        )

    @property
    def mirror_v2(self) -> HttpResult:
        return self.http(f"{self.mirror_url}/v2/", timeout=self.timeouts.mirror_s)

    # ------------------------------------------------------------ the running containerd

    @property
    def socket(self) -> cri.SocketAnswer | None:
        """The containerd socket's answer (None without a layout)."""

        def ask() -> cri.SocketAnswer | None:
            if self.layout is None:
                return None
            path = self.node.path(self.layout.containerd_socket)
            return cri.query(path, self.timeouts.socket_s)

        return self._once("socket", ask)

    @property
    def live_config(self) -> LiveConfig | None:
        """The running CRI config: from the socket, else `crictl info` on a live root."""
        return self._once("live_config", self._live_config)

    def _live_config(self) -> LiveConfig | None:
        answer = self.socket
        if answer is None or answer.state != "ok":
            return None
        raw = answer.info.get("config")
        if raw:
            return _parse_live_config(raw, "the running containerd")
        if not self.live or self.layout is None:
            return None
        for binary in self._crictl_candidates():
            endpoint = f"unix://{self.node.path(self.layout.containerd_socket)}"
            done = run_program(
                [binary, "--runtime-endpoint", endpoint, "--timeout", "1s", "info"],
                self.timeouts.program_s,
            )
            if done.returncode == 0:
                return _parse_crictl(done, binary)
        return None

    def _crictl_candidates(self) -> list[str]:
        if self._crictl_binaries is not None:
            return [b for b in self._crictl_binaries if os.access(b, os.X_OK)]
        names = (*flavor_record(self.flavor).crictl_bins, *COMMON_CRICTL)
        return [str(self.node.path(n)) for n in names if os.access(self.node.path(n), os.X_OK)]

    @property
    def containerd_version(self) -> ContainerdVersion:
        return self._once("version", self._version)

    def _version(self) -> ContainerdVersion:
        answer = self.socket
        if answer is not None and answer.state == "ok" and answer.version:
            return _version_of(answer.version, "the running containerd")
        if not self.live:
            return ContainerdVersion(None, "", "containerd does not answer on its socket")
        for binary in self._containerd_candidates():
            done = run_program([binary, "--version"], self.timeouts.program_s)
            words = done.stdout.split()
            if done.returncode == 0 and len(words) >= 3:
                return _version_of(words[2], f"{binary} --version")
        return ContainerdVersion(None, "", "no containerd binary answered --version")

    def _containerd_candidates(self) -> list[str]:
        if self._containerd_binaries is not None:
            return [b for b in self._containerd_binaries if os.access(b, os.X_OK)]
        found: list[str] = []
        socket_path = self.layout.containerd_socket if self.layout else None
        for proc in self.processes:
            if proc.pid is None or (socket_path and (proc.address or socket_path) != socket_path):
                continue
            try:
                found.append(os.readlink(f"/proc/{proc.pid}/exe"))
            except OSError:
                continue
        names = (*flavor_record(self.flavor).containerd_bins, *COMMON_CONTAINERD)
        found += [str(self.node.path(n)) for n in names]
        usable = [b for b in dict.fromkeys(found) if os.access(b, os.X_OK)]
        return usable[:2]  # each run may take the program timeout: bound the total

    # ------------------------------------------------------------ CRI settings

    def setting(self, key: str) -> Setting:
        """`config_path`, `discard_unpacked_layers` or `use_local_image_pull`: live wins."""
        config = self.config
        file_value = getattr(config, key) if config is not None else None
        if file_value == "":
            file_value = None
        live = self.live_config
        where = config.path if config is not None else "no config file"
        if live is not None:
            live_value = getattr(live, key)
            if live_value == "":
                live_value = None
            # An empty live config_path means "none" only on 1.x: 2.x's CRI status does not carry
            # the images plugin's registry settings (2.1.9 reports an empty configPath there).
            empty_is_none = self.containerd_version.at_least((2, 0, 0)) is not True
            if live_value is not None or (key == "config_path" and empty_is_none):
                return Setting(live_value, live.source, file_value, live_value, True)
        return Setting(file_value, where, file_value, None, False)

    @property
    def hosts_roots(self) -> HostsRoots:
        """The hosts dirs containerd searches, in order, and whether it reads them at all."""
        return self._once("hosts_roots", self._hosts_roots)

    def _hosts_roots(self) -> HostsRoots:
        config_path = self.setting("config_path")
        if config_path.value:
            roots = tuple(p for p in str(config_path.value).split(":") if p)
            return HostsRoots(roots, f"from {config_path.source}", True)
        if self.containerd_version.at_least(DEFAULT_CONFIG_PATH_SINCE):
            return HostsRoots(DEFAULT_CONFIG_PATH, "containerd 2.2+ default config_path", True)
        layout = self.layout
        if layout is not None and layout.config is None and layout.config_path_set:
            return HostsRoots(layout.hosts_dirs, f"{layout.flavor} default (not confirmed)", None)
        return HostsRoots((self.hosts_dir,), "config_path unset", False)

    def lookup(self, target: HostsTarget) -> Found | None:
        """The directory containerd reads for `target`: the first existing of its names, root
        after root (containerd's HostDirFromRoot; an existing entry wins even if empty)."""
        for root in self.hosts_roots.roots:
            names = self.root_names(root)
            for name in target.dir_names:
                if name in names:
                    return Found(root, name)
        return None

    def root_names(self, root: str) -> frozenset[str]:
        """The entries of a hosts root, listed once per run (a run with 5,000 registries asks
        for each): lexists semantics, a dangling link counts."""

        def listing() -> frozenset[str]:
            try:
                return frozenset(os.listdir(self.real_dir(root)))
            except OSError:
                return frozenset()

        return self._once(f"names {root}", listing)

    def path(self, node_path: str) -> Path:
        """`node.path`, with each parent directory resolved once per run (lstat semantics for
        the last component, as `node.path`)."""
        parent, _, last = node_path.rstrip("/").rpartition("/")
        if not last or parent in ("", "/") or self.node.root == Path("/"):
            return self.node.path(node_path)
        return self.real_dir(parent) / last

    def real_dir(self, node_path: str) -> Path:
        """`node.real_path` of a directory, resolved once per run."""
        key = node_path.rstrip("/") or "/"
        return self._once(f"dir {key}", lambda: self.node.real_path(key))

    def hosts_targets(self) -> list[HostsTarget]:
        """The registries that should go through Spegel. With `registries = []`: `_default`,
        plus every registry dir already in the hosts dir (it would bypass `_default`)."""
        registries = self.settings.registries
        if registries:
            return [HostsTarget(r.host, r, (*r.dir_names, DEFAULT_DIR)) for r in registries]
        targets = [HostsTarget(DEFAULT_DIR, None, (DEFAULT_DIR,))]
        seen: set[str] = set()
        for name in self.hosts_dir_names():
            if name.startswith(("_", ".")):
                continue
            registry = registry_for_host(name)
            if registry.host not in seen:
                seen.add(registry.host)
                targets.append(
                    HostsTarget(registry.host, registry, (*registry.dir_names, DEFAULT_DIR))
                )
        return targets

    def hosts_dir_names(self) -> list[str]:
        """Entries of spegel-node's hosts dir, sorted ([] when it does not exist)."""
        try:
            return sorted(os.listdir(self.node.path(self.hosts_dir)))
        except OSError:
            return []

    # ------------------------------------------------------------ files

    def read_file(self, node_path: str) -> bytes | None:
        """A regular file's bytes (at most MAX_FILE + 1), None when it does not exist.
        Opened without blocking (a FIFO cannot hang doctor); OSError for anything else."""
        return self.read_path(self.path(node_path), node_path)

    def read_path(self, path: Path, shown: str) -> bytes | None:
        """`read_file` of a host path already resolved."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise IsADirectoryError(f"{shown} is not a regular file")
            return f.read(MAX_FILE + 1)

    @property
    def record(self) -> state.Record | None:
        return self._once("record", self._load_record)[0]

    @property
    def record_error(self) -> str:
        return self._once("record", self._load_record)[1]

    def _load_record(self) -> tuple[state.Record | None, str]:
        """The state record, read only (never the lock, never creating the state dir)."""
        if not (state.state_dir(self.node) / state.STATE_FILE).exists():
            return None, ""
        try:
            return state.load_record(self.node), ""
        except SpegelNodeError as e:
            return None, str(e)

    @property
    def gate_withdrawn(self) -> bool:
        record = self.record
        return record is not None and record.gate.withdrawn

    def run(self, argv: Sequence[str]) -> RunResult:
        """A program on a live root, with the program timeout (never on other roots)."""
        if not self.live:
            return RunResult(tuple(argv), None, error="not a live root")
        return run_program(argv, self.timeouts.program_s)


def _version_of(text: str, source: str) -> ContainerdVersion:
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


def _parse_live_config(raw: str, source: str) -> LiveConfig | None:
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
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


def _parse_crictl(done: RunResult, binary: str) -> LiveConfig | None:
    try:
        info = json.loads(done.stdout)
    except ValueError:
        return None
    config = info.get("config") if isinstance(info, dict) else None
    if isinstance(config, dict):
        return _parse_live_config(json.dumps(config), f"`{binary} info`")
    if isinstance(config, str):
        return _parse_live_config(config, f"`{binary} info`")
    return None

"""Everything doctor reads from the node, gathered lazily, once, and shared by the checks.

Checks run on their own threads and ask for what they need; each fact is computed by the first
check that asks (the others wait for it) and cached. All of it is read-only: nothing here
creates, locks or writes anything on the node. Programs (`containerd --version`, `crictl info`,
`systemctl`) only run when the root is this machine's own `/` (`live`).
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from spegel_node import fsutil, state
from spegel_node.containerd_config import (
    ContainerdConfig,
    ContainerdConfigError,
    read_containerd_config,
)
from spegel_node.doctor import cri
from spegel_node.doctor.cri_settings import (
    ContainerdVersion,
    HostsRoots,
    LiveConfig,
    Setting,
    effective_setting,
    hosts_roots,
    parse_crictl_info,
    parse_live_config,
    version_of,
)
from spegel_node.doctor.imageref import ImageRef
from spegel_node.doctor.probes import HttpResult, RunResult, http_request, run_program
from spegel_node.errors import SpegelNodeError
from spegel_node.flavors import COMMON_CONTAINERD, COMMON_CRICTL, FALLBACK_HOSTS_DIR
from spegel_node.flavors import flavor as flavor_record
from spegel_node.hostsdir_rules import DEFAULT_DIR, lookup_order, managed_dirs
from spegel_node.layout import ContainerdProcess, Layout, detect, running_containerd
from spegel_node.node import Node
from spegel_node.nodeip import resolve_node_ip
from spegel_node.record import Record
from spegel_node.registry import Registry, registry_for_host
from spegel_node.settings import Settings

T = TypeVar("T")

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
        command_options: Sequence[tuple[str, str]] = (),
        layout: Layout | None = None,
    ) -> None:
        """`layout`: one already detected (apply's), used instead of detecting again."""
        self.node = node
        # (flag, value) doctor was given besides --root (--config, --hosts-dir, ...): the fix
        # commands doctor prints repeat them (remedy.cli_command)
        self.command_options = tuple(command_options)
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
        if layout is not None:
            self._slots["layout"] = _Slot(done=True, value=(layout, ""))

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
        return self._once("node_ip", lambda: resolve_node_ip(self.settings.node_ip))

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
            return parse_live_config(raw, "the running containerd")
        if not self.live or self.layout is None:
            return None
        for binary in self._crictl_candidates():
            endpoint = f"unix://{self.node.path(self.layout.containerd_socket)}"
            done = run_program(
                [binary, "--runtime-endpoint", endpoint, "--timeout", "1s", "info"],
                self.timeouts.program_s,
            )
            if done.returncode == 0:
                return parse_crictl_info(done.stdout, binary)
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
            return version_of(answer.version, "the running containerd")
        if not self.live:
            return ContainerdVersion(None, "", "containerd does not answer on its socket")
        for binary in self._containerd_candidates():
            done = run_program([binary, "--version"], self.timeouts.program_s)
            words = done.stdout.split()
            if done.returncode == 0 and len(words) >= 3:
                return version_of(words[2], f"{binary} --version")
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
        return effective_setting(key, self.config, self.live_config, self.containerd_version)

    @property
    def hosts_roots(self) -> HostsRoots:
        """The hosts dirs containerd searches, in order, and whether it reads them at all."""
        return self._once(
            "hosts_roots",
            lambda: hosts_roots(
                self.setting("config_path"), self.containerd_version, self.layout, self.hosts_dir
            ),
        )

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
        by_host = {r.host: r for r in self.settings.registries}
        targets: dict[str, HostsTarget] = {}
        for d in managed_dirs(list(by_host), self.hosts_dir_entries()):
            if d.host is None:
                targets[DEFAULT_DIR] = HostsTarget(DEFAULT_DIR, None, lookup_order(None))
            elif d.host not in targets:  # `host_port_` and `host:port` are one registry
                registry = by_host.get(d.host) or registry_for_host(d.host)
                targets[d.host] = HostsTarget(d.host, registry, lookup_order(d.host))
        return list(targets.values())

    def hosts_dir_entries(self) -> dict[str, bool]:
        """Entries of spegel-node's hosts dir: name -> a dir or a symlink ({} when it is absent)."""
        try:
            with os.scandir(self.node.path(self.hosts_dir)) as it:
                return {e.name: e.is_dir(follow_symlinks=False) or e.is_symlink() for e in it}
        except OSError:
            return {}

    # ------------------------------------------------------------ files

    def read_file(self, node_path: str) -> bytes | None:
        """A regular file's bytes (at most MAX_FILE + 1), None when it does not exist; OSError
        for anything else (fsutil.read_file: a FIFO cannot hang doctor)."""
        return self.read_path(self.path(node_path))

    def read_path(self, path: Path) -> bytes | None:
        """`read_file` of a host path already resolved."""
        try:
            return fsutil.read_file(path, MAX_FILE)
        except FileNotFoundError:
            return None

    @property
    def record(self) -> Record | None:
        return self._once("record", self._load_record)[0]

    @property
    def record_error(self) -> str:
        return self._once("record", self._load_record)[1]

    def _load_record(self) -> tuple[Record | None, str]:
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

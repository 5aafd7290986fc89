"""Which node this is and where its containerd keeps things: flavor, socket, config, hosts dir.

Evidence, strongest first: overrides given by the operator; on a live root, the running
containerd's command line; the containerd config (its `config_path`, `[grpc] address`, `root`);
then each flavor's conventions. Every path is a node path.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from spegel_node import flavors
from spegel_node.containerd_config import (
    ContainerdConfig,
    ContainerdConfigError,
    content_dir,
    read_containerd_config,
)
from spegel_node.errors import SpegelNodeError
from spegel_node.flavors import Flavor
from spegel_node.node import Node

DEFAULT_SOCKET = flavors.DEFAULT_SOCKET
DEFAULT_CONTAINERD_CONFIG = flavors.DEFAULT_CONTAINERD_CONFIG
FLAVORS = tuple(flavors.FLAVORS)
OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")
# containerd instances that do not serve the kubelet (Talos system, Docker's, Bottlerocket host).
NON_CRI_SOCKETS = frozenset(
    {
        "/system/run/containerd/containerd.sock",
        "/run/docker/containerd/containerd.sock",
        "/var/run/docker/containerd/containerd.sock",
        "/run/host-containerd/containerd.sock",
    }
)


class NoLayout(SpegelNodeError):
    """No containerd was found on the node (exit 1)."""


@dataclass(frozen=True)
class ContainerdProcess:
    """A running containerd, from its command line. None = flag not given (containerd default)."""

    pid: int | None
    config: str | None
    address: str | None
    root: str | None

    @property
    def effective_config(self) -> str:
        return self.config or DEFAULT_CONTAINERD_CONFIG

    def describe(self) -> str:
        flags = [
            f"--{name} {value}"
            for name, value in (
                ("config", self.config),
                ("address", self.address),
                ("root", self.root),
            )
            if value
        ]
        pid = f" (pid {self.pid})" if self.pid is not None else ""
        return " ".join(["process containerd", *flags]) + pid


@dataclass(frozen=True)
class Layout:
    flavor: str
    containerd_socket: str
    containerd_config: str | None
    hosts_dir: str | None
    hosts_dirs: tuple[str, ...]
    config_path_set: bool
    content_dir: str
    distro_owned: bool
    evidence: tuple[str, ...]
    config: ContainerdConfig | None

    def to_json(self) -> dict[str, object]:
        return {
            "flavor": self.flavor,
            "containerd_socket": self.containerd_socket,
            "containerd_config": self.containerd_config,
            "hosts_dir": self.hosts_dir,
            "hosts_dirs": list(self.hosts_dirs),
            "config_path_set": self.config_path_set,
            "content_dir": self.content_dir,
            "distro_owned": self.distro_owned,
            "evidence": list(self.evidence),
            "config": _config_json(self.config),
        }


def _config_json(config: ContainerdConfig | None) -> dict[str, object] | None:
    if config is None:
        return None
    return {
        "path": config.path,
        "version": config.version,
        "config_path": config.config_path,
        "discard_unpacked_layers": config.discard_unpacked_layers,
        "use_local_image_pull": config.use_local_image_pull,
        "registry_mirrors": config.registry_mirrors,
        "root": config.root,
        "sources": list(config.sources),
        "missing_imports": list(config.missing_imports),
    }


# --- the running containerd ----------------------------------------------------------------------

_FLAG_NAMES = {
    "config": "config",
    "c": "config",
    "address": "address",
    "a": "address",
    "root": "root",
}


def parse_containerd_cmdline(
    argv: Sequence[str], pid: int | None = None
) -> ContainerdProcess | None:
    """The containerd daemon's settings from its argv; None if argv is not a containerd daemon.

    Accepts Go flag forms: `--config X`, `--config=X`, `-config X`, `-c X`, `-c=X`.
    """
    if not argv or posixpath.basename(argv[0]) != "containerd":
        return None
    if len(argv) > 1 and not argv[1].startswith("-"):
        return None  # a subcommand (`containerd config dump`), not the daemon
    found: dict[str, str] = {}
    i = 1
    while i < len(argv):
        name, eq, value = argv[i].lstrip("-").partition("=")
        key = _FLAG_NAMES.get(name) if argv[i].startswith("-") else None
        if key and not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
            i += 1
        if key and value:
            found[key] = value
        i += 1
    return ContainerdProcess(pid, found.get("config"), found.get("address"), found.get("root"))


def running_containerd() -> list[ContainerdProcess]:
    """Running containerd daemons on this machine; processes that cannot be read are skipped."""
    import psutil  # only on live roots

    out: list[ContainerdProcess] = []
    try:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            parsed = parse_containerd_cmdline(proc.info.get("cmdline") or [], proc.info.get("pid"))
            if parsed is not None:
                out.append(parsed)
    except (psutil.Error, OSError):
        pass  # no /proc, or the process table cannot be listed: no process evidence
    return out


def _process_score(p: ContainerdProcess, d: Flavor) -> int:
    """How well a process fits a flavor: its config (3) and its socket (2); 0 = not this flavor."""
    return (p.effective_config == d.config) * 3 + ((p.address or DEFAULT_SOCKET) == d.socket) * 2


def _pick_process(procs: Sequence[ContainerdProcess], flavor: str) -> ContainerdProcess | None:
    """The process serving this flavor: the best match of its socket and config.

    Plain containerd also takes any other containerd that is not a known non-CRI instance.
    """
    d = flavors.FLAVORS[flavor]
    best: tuple[int, ContainerdProcess | None] = (0, None)
    for p in procs:
        score = _process_score(p, d)
        if score > best[0]:
            best = (score, p)
    if best[1] is not None or flavor != flavors.PLAIN.name:
        return best[1]
    others = [p for p in procs if (p.address or DEFAULT_SOCKET) not in NON_CRI_SOCKETS]
    return others[0] if others else None


# --- flavor --------------------------------------------------------------------------------------


def _os_release_id(node: Node) -> tuple[str, str] | None:
    for path in OS_RELEASE:
        try:
            text = node.path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.strip().partition("=")
            if key == "ID":
                return path, value.strip().strip("\"'").lower()
        return None
    return None


def _marker_hits(node: Node) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    os_id = _os_release_id(node)
    for f in flavors.FLAVORS.values():
        if os_id and f.os_id and os_id[1] == f.os_id:
            hits[f.name] = [f"marker {os_id[0]} ID={os_id[1]}"]
        found = [f"marker {m}" for m in f.markers if node.path(m).exists()]
        if found:
            hits[f.name] = found
    return hits


def _choose_flavor(
    node: Node, hits: dict[str, list[str]], procs: Sequence[ContainerdProcess]
) -> str | None:
    """Among flavors whose markers match: the one a process serves, else one whose config exists."""
    matched = [f for f in flavors.FLAVORS if f in hits]
    if len(matched) <= 1:
        return matched[0] if matched else None
    scores = {
        f: max((_process_score(p, flavors.FLAVORS[f]) for p in procs), default=0) for f in matched
    }
    best = max(matched, key=lambda f: scores[f])  # the first of equals, in marker order
    if scores[best] > 0:
        return best
    for flavor in matched:
        if node.path(flavors.FLAVORS[flavor].config).is_file():
            return flavor
    return matched[0]


def _plain_containerd(node: Node, procs: Sequence[ContainerdProcess]) -> bool:
    """A containerd without a known distro: its socket, its config or a running daemon."""
    return (
        node.path(DEFAULT_SOCKET).exists()
        or node.path(DEFAULT_CONTAINERD_CONFIG).is_file()
        or _pick_process(procs, flavors.PLAIN.name) is not None
    )


def _no_layout(node: Node) -> NoLayout:
    os_ids = "|".join(f.os_id for f in flavors.FLAVORS.values() if f.os_id)
    markers = sorted(
        {m for f in flavors.FLAVORS.values() for m in f.markers} | {f"/etc/os-release ID={os_ids}"}
    )
    where = f" under {node.root}" if str(node.root) != "/" else ""
    return NoLayout(
        f"no containerd found{where}: looked for distro markers ({', '.join(markers)}), "
        f"the socket {DEFAULT_SOCKET}, the config {DEFAULT_CONTAINERD_CONFIG}"
        + (" and a running containerd process" if node.is_live else "")
        + "; set --containerd-socket/--containerd-config/--hosts-dir for other layouts"
    )


# --- detect --------------------------------------------------------------------------------------


def detect(
    node: Node,
    *,
    hosts_dir: str = "",
    containerd_socket: str = "",
    containerd_config: str = "",
    processes: Sequence[ContainerdProcess] | None = None,
) -> Layout:
    """Identify the node's flavor and containerd layout. Non-empty overrides win over everything.

    `processes`: the running containerd daemons; by default read from the system on a live root
    only (a root mounted elsewhere, e.g. /host, has no processes of its own to show).
    """
    procs = (
        list(processes) if processes is not None else (running_containerd() if node.is_live else [])
    )
    overrides = {
        "--hosts-dir": hosts_dir,
        "--containerd-socket": containerd_socket,
        "--containerd-config": containerd_config,
    }
    override_lines = [f"override {flag} {value}" for flag, value in overrides.items() if value]
    hits = _marker_hits(node)
    flavor = _choose_flavor(node, hits, procs)
    if flavor is None and not override_lines and not _plain_containerd(node, procs):
        raise _no_layout(node)
    flavor = flavor or flavors.PLAIN.name
    d = flavors.FLAVORS[flavor]
    evidence = list(hits.get(flavor, []))
    evidence += [f"marker {m}" for m in d.evidence_markers if node.path(m).exists()]
    if containerd_socket or containerd_config:
        # The operator named a containerd: only a process running with that config or socket
        # speaks for it (another daemon's --root would give the wrong content dir).
        procs = [
            p
            for p in procs
            if (containerd_config and p.effective_config == containerd_config)
            or (containerd_socket and p.address == containerd_socket)
        ]
    proc = _pick_process(procs, flavor)
    if proc is not None:
        evidence.append(proc.describe())

    config_path, config, config_lines = _config(node, d, proc, containerd_config)
    proc_address, proc_root = (proc.address, proc.root) if proc else (None, None)
    conf_address, conf_root = (config.address, config.root) if config else (None, None)
    socket = _first(containerd_socket, proc_address, conf_address, d.socket)
    if node.path(socket).exists():
        evidence.append(f"socket {socket}")
    dirs, config_path_set, dir_lines = _hosts_dirs(flavor, d, config, hosts_dir)
    root = _first(proc_root, conf_root, d.root)
    return Layout(
        flavor=flavor,
        containerd_socket=socket,
        containerd_config=config_path,
        hosts_dir=dirs[0] if dirs else None,
        hosts_dirs=dirs,
        config_path_set=config_path_set,
        content_dir=content_dir(root),
        distro_owned=d.distro_owned,
        evidence=tuple(dict.fromkeys([*evidence, *config_lines, *dir_lines, *override_lines])),
        config=config,
    )


def _first(*values: str | None) -> str:
    """The first non-empty value (the last one is a flavor default and always set)."""
    return next(v for v in values if v)


def _config(
    node: Node, d: Flavor, proc: ContainerdProcess | None, override: str
) -> tuple[str | None, ContainerdConfig | None, list[str]]:
    """The config file's node path (None if absent), its parsed form when readable, evidence."""
    path = override or (proc.effective_config if proc else d.config)
    if not node.path(path).exists():
        return (path if override else None), None, [f"no containerd config at {path}"]
    try:
        config = read_containerd_config(node, path)
    except ContainerdConfigError as e:
        return path, None, [f"config unreadable: {e}"]
    lines = [_config_line(config)]
    if len(config.sources) > 1:
        lines.append(f"config {path} merged from {', '.join(config.sources)}")
    lines += [
        f"config {path} imports {m}, which does not exist (containerd will not start)"
        for m in config.missing_imports
    ]
    return path, config, lines


def _config_line(config: ContainerdConfig) -> str:
    if config.config_path:
        return f"config {config.path} sets config_path {config.config_path}"
    return f"config {config.path} does not set config_path"


def _hosts_dirs(
    flavor: str, d: Flavor, config: ContainerdConfig | None, override: str
) -> tuple[tuple[str, ...], bool, list[str]]:
    """Hosts dirs (the one to write first), whether config_path is set, and evidence."""
    lines: list[str] = []
    if config is not None:
        config_path_set = bool(config.hosts_dirs)
        dirs = config.hosts_dirs
    else:
        config_path_set = d.sets_config_path
        dirs = ()
        if config_path_set:
            lines.append(f"config_path assumed: {flavor} sets it by default")
    if not dirs and d.hosts_dir:
        dirs = tuple(p for p in d.hosts_dir.split(":") if p)
    if override:
        dirs = (override, *(p for p in dirs if p != override))
    return dirs, config_path_set, lines

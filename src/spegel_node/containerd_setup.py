"""configure-containerd: make containerd read the hosts dir and keep unpacked layers.

Sets the CRI `config_path` (to the node's hosts dir) and `discard_unpacked_layers = false`
where this node's containerd actually takes them from:

- plain containerd (kubeadm, Debian/Ubuntu) and kind: `/etc/containerd/config.toml` (or the
  config given), edited in place with everything else kept (tomlkit), or created when absent
  (as `version = 2`, which containerd 1.x reads and 2.x migrates on load).
  On containerd 1.x (config versions 1 and 2) a file that sets a CRI plugin table *replaces*
  the whole table set by earlier files (containerd issue #5837; seen with 1.6.20 here:
  `containerd config dump` shows config_path back at "" once an import sets
  `[plugins."io.containerd.grpc.v1.cri".cni]`). So the keys go into the *last* file in
  containerd's load order that has a CRI table (the main file when none does), never into
  a new drop-in. Version 3 files (containerd 2.x, merged key by key) get them in the last file
  that sets either key, else the main file.
- k0s with its k0s-managed `/etc/k0s/containerd.toml`: a drop-in
  `/etc/k0s/containerd.d/spegel-node.toml`, which k0s merges into its generated CRI config
  (k0s docs, "k0s managed dynamic runtime configuration"). Its version follows k0s's generated
  `/run/k0s/containerd-cri.toml` (3 when k0s has not generated it yet).

Refused (exit 1), with what to do instead: Talos and Bottlerocket (the OS renders containerd's
config), k3s, RKE2, MicroK8s and EKS (they generate it and set `config_path` themselves), a
config with a non-empty `registry.mirrors` (containerd rejects `mirrors` together with
`config_path`), a config_path that leaves out the hosts dir spegel-node was told to use, and
a config whose named imports are missing (containerd would not start again).

Writes are atomic (temp file, fsync, rename) and only happen when the text changes; the file's
mode is kept. The result says whether containerd must be restarted: after a change, and on a
live root also when the running containerd started before its config was last changed.
"""

from __future__ import annotations

import copy
import os
import posixpath
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from spegel_node import fsutil, tomlload
from spegel_node.changes import FileChange
from spegel_node.containerd_config import (
    KNOWN_VERSIONS,
    V1_CRI,
    V2_CRI,
    V3_IMAGES,
    ContainerdConfig,
    config_snippet,
    managed_dropin,
    read_containerd_config,
)
from spegel_node.errors import Refused, SpegelNodeError
from spegel_node.flavors import ConfigDropin, Flavor
from spegel_node.flavors import flavor as flavor_record
from spegel_node.instructions import TALOS_DISCARD_PART, bottlerocket_settings
from spegel_node.layout import Layout, parse_containerd_cmdline
from spegel_node.node import Node

MANAGED_HEADER = "# managed by spegel-node configure-containerd\n"
NEW_FILE_VERSION = 2  # read by containerd 1.x, migrated on load by 2.x
CONFIG_MODE = 0o644
START_SLACK_S = 0.05  # clock ticks and timestamp rounding


class UnsafeEdit(SpegelNodeError):
    """The edited file would not parse to exactly the intended settings."""


@dataclass(frozen=True)
class Placement:
    """Where one setting lives in a config of some version: table path and key."""

    table: tuple[str, ...]
    key: str
    value: str | bool


@dataclass(frozen=True)
class SetupPlan:
    flavor: str
    path: str  # node path of the file to write
    version: int  # the config version whose table layout the file uses
    before: str | None  # current text; None = the file does not exist
    after: str
    config_path: str  # the config_path containerd will have
    service: str  # the systemd unit that restarts this containerd
    notes: tuple[str, ...] = ()

    @property
    def file(self) -> FileChange:
        before = None if self.before is None else self.before.encode("utf-8")
        return FileChange(self.path, before, self.after.encode("utf-8"))

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def diff(self) -> str:
        return self.file.diff()


@dataclass(frozen=True)
class SetupOutcome:
    plan: SetupPlan
    dry_run: bool
    restart_required: bool
    restart_reason: str = ""
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "changed": plan.changed,
            "path": plan.path,
            "restart_required": self.restart_required,
            "dry_run": self.dry_run,
            "flavor": plan.flavor,
            "version": plan.version,
            "config_path": plan.config_path,
            "discard_unpacked_layers": False,
            "service": plan.service,
            "restart_reason": self.restart_reason,
            "diff": plan.diff(),
            "notes": [*plan.notes, *self.notes],
            "nothing_to_do": False,
        }


# --- refusals ------------------------------------------------------------------------------------


class NothingToConfigure(Refused):
    """The distro already sets what configure-containerd would: nothing to do, exit 0 (SPEC:
    "0 done or nothing to do"). The CLI reports it with `nothing_to_configure_report`."""


def nothing_to_configure_report(
    reason: NothingToConfigure, flavor: str, dry_run: bool, output: str
) -> None:
    """The result for a node with nothing to configure: JSON with the usual keys, or one line."""
    from spegel_node.output import print_json

    if output == "json":
        print_json(
            {
                "changed": False,
                "path": None,
                "restart_required": False,
                "dry_run": dry_run,
                "flavor": flavor,
                "nothing_to_do": True,
                "restart_reason": "",
                "diff": "",
                "notes": [str(reason)],
            }
        )
    else:
        print(str(reason))


def _refusal(layout: Layout, hosts_dir: str, mirror_urls: Sequence[str]) -> Refused | None:
    record = flavor_record(layout.flavor)
    config = layout.containerd_config or record.config
    via = record.cri_config_via
    if via == "machine-config":
        return Refused(
            f"{record.display} generates containerd's config from its machine config (/etc is "
            f"read-only) and already sets config_path to {hosts_dir}; set "
            "discard_unpacked_layers = false with a machine config patch instead (save as "
            "discard.yaml, then: talosctl patch mc --nodes NODE --patch @discard.yaml):\n"
            "machine:\n  files:\n" + TALOS_DISCARD_PART
        )
    if via == "api-settings":
        return Refused(
            f"{record.display} renders containerd's config from its API settings (/etc/containerd "
            "is a tmpfs); configure the registry mirrors there instead, e.g.:\n"
            + bottlerocket_settings((), mirror_urls).rstrip("\n")
        )
    if via == "rancher-template":
        return NothingToConfigure(
            f"{record.name} generates {config} at every start and already sets config_path to "
            f"{hosts_dir} (discard_unpacked_layers is false unless you changed its template); "
            f"nothing to configure: leave configure-containerd off for {record.name} nodes "
            "(Ansible: spegel_node_configure_containerd: false)"
        )
    if via == "microk8s-template":
        return NothingToConfigure(
            f"{record.display} already sets config_path to {hosts_dir} in {config}; nothing to "
            f"configure: leave configure-containerd off for {record.display} nodes"
        )
    if via == "nodeadm":
        return Refused(
            f"nodeadm rewrites {config} at every boot and already sets config_path; set "
            "discard_unpacked_layers = false in the NodeConfig (spec.containerd.config) instead:\n"
            + config_snippet(3, discard_unpacked_layers=False).rstrip("\n")
        )
    return None


def _check_config(config: ContainerdConfig | None, hosts_dir: str, override: str) -> None:
    if config is None:
        return
    if config.registry_mirrors:
        raise Refused(
            f"{config.path} sets registry.mirrors, and containerd refuses `mirrors` together with "
            "config_path; move those mirrors to hosts.toml files under "
            f"{hosts_dir} and delete the registry.mirrors table first"
        )
    if config.missing_imports:
        raise Refused(
            f"{config.path} imports {', '.join(config.missing_imports)}, which does not exist; "
            "containerd would not start again: fix the imports first"
        )
    if config.hosts_dirs and override and override not in config.hosts_dirs:
        raise Refused(
            f"containerd's config_path is {config.config_path}, which does not include the "
            f"hosts dir {override} spegel-node is configured with; set hosts_dir to one of "
            f"{', '.join(config.hosts_dirs)} or change config_path by hand"
        )


# --- where the settings go -----------------------------------------------------------------------


def placements(version: int, config_path: str) -> list[Placement]:
    """The two settings' tables and keys in a config of `version`."""
    if version >= 3:  # 4 (containerd 2.3+) keeps version 3's CRI tables
        return [
            Placement(("plugins", V3_IMAGES, "registry"), "config_path", config_path),
            Placement(("plugins", V3_IMAGES), "discard_unpacked_layers", False),
        ]
    cri = V1_CRI if version == 1 else V2_CRI
    return [
        Placement(("plugins", cri, "registry"), "config_path", config_path),
        Placement(("plugins", cri, "containerd"), "discard_unpacked_layers", False),
    ]


def _file_version(data: dict[str, Any], default: int) -> int:
    version = data.get("version")
    return version if isinstance(version, int) and version in KNOWN_VERSIONS else default


def _has_cri_table(data: dict[str, Any], version: int) -> bool:
    plugins = data.get("plugins")
    if not isinstance(plugins, dict):
        return False
    names = (V3_IMAGES,) if version >= 3 else ((V1_CRI,) if version == 1 else (V2_CRI, V3_IMAGES))
    return any(isinstance(plugins.get(n), dict) for n in names)


def _sets_v3_key(data: dict[str, Any]) -> bool:
    images = (data.get("plugins") or {}).get(V3_IMAGES)
    if not isinstance(images, dict):
        return False
    registry = images.get("registry")
    return "discard_unpacked_layers" in images or (
        isinstance(registry, dict) and "config_path" in registry
    )


def _load_toml(node: Node, path: str) -> dict[str, Any]:
    return tomlload.loads(fsutil.read_file(node.path(path), tomlload.MAX_BYTES))


def target_file(node: Node, config: ContainerdConfig) -> str:
    """The file (node path) whose settings win in containerd's load order.

    Versions 1-2 (containerd 1.x): the last file with a CRI table replaces earlier ones whole.
    Version 3 (containerd 2.x, key-by-key merge): the last file setting either key. Imported
    files use the main file's table names (containerd 1.6.20 here ignores a `plugins.cri` table
    in an import of a version 2 file).
    """
    target = config.path
    for source in config.sources:
        data = _load_toml(node, source)
        v3 = config.version >= 3
        if _sets_v3_key(data) if v3 else _has_cri_table(data, config.version):
            target = source
    return target


def _dropin_version(node: Node, dropin: ConfigDropin) -> tuple[int, str]:
    try:
        data = _load_toml(node, dropin.generated)
    except (OSError, tomlload.TomlLoadError):
        return 3, (
            f"{dropin.generated} not found (not generated yet?): wrote a version 3 drop-in, as "
            "for containerd 2.x"
        )
    return _file_version(data, 3), ""


def _service(node: Node, record: Flavor) -> str:
    """The first of the flavor's containerd units installed on the node (else the first)."""
    for unit in record.services:
        for base in ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"):
            if node.path(posixpath.join(base, unit)).exists():
                return unit
    return record.services[0]


# --- editing TOML --------------------------------------------------------------------------------


def _deep_set(data: dict[str, Any], p: Placement) -> None:
    table = data
    for name in p.table:
        table = table.setdefault(name, {})
    table[p.key] = p.value


def _lookup(data: dict[str, Any], names: Sequence[str]) -> dict[str, Any] | None:
    table: Any = data
    for name in names:
        if not isinstance(table, dict) or name not in table:
            return None
        table = table[name]
    return table if isinstance(table, dict) else None


def _key_indent(table: Any) -> str:
    """The indentation of the table's existing keys, else one step past its header's."""
    body = getattr(getattr(table, "value", None), "body", None) or []
    for key, item in body:
        if key is None or isinstance(item, (tomlkit.items.Whitespace, tomlkit.items.Table)):
            continue
        return str(item.trivia.indent)
    header = str(getattr(getattr(table, "trivia", None), "indent", "")).split("\n")[-1]
    return header + "  " if header else ""


def _set_in_doc(doc: Any, p: Placement) -> bool:
    """Set p in the tomlkit document if its table exists; False if the table must be added."""
    table: Any = doc
    for name in p.table:
        if name not in table:
            return False
        table = table[name]
        if not hasattr(table, "__setitem__"):
            return False
    if p.key in table:
        if table[p.key] != p.value:
            table[p.key] = p.value
        return True
    indent = _key_indent(table)
    table[p.key] = p.value
    item = table.value.item(p.key) if hasattr(table, "value") else None
    if item is not None and indent:
        item.trivia.indent = indent
    return True


def edit_config_text(text: str | None, version: int, wanted: Sequence[Placement]) -> str:
    """`text` with the settings in place and everything else kept; a new file when None.

    The result is checked: it must parse to the original data with exactly these keys set.
    """
    if text is None:
        body = config_snippet(version, **{p.key: p.value for p in wanted})  # type: ignore[arg-type]
        return f"{MANAGED_HEADER}version = {version}\n\n{body}"
    before = tomlload.loads(text)
    expected = copy.deepcopy(before)
    for p in wanted:
        _deep_set(expected, p)
    if expected == before:
        return text  # already right: the file stays byte for byte
    missing: dict[tuple[str, ...], list[Placement]] = {}
    try:
        doc = tomlkit.parse(text)
        for p in wanted:
            current = _lookup(before, p.table)
            if current is not None and current.get(p.key) == p.value:
                continue
            if not _set_in_doc(doc, p):
                missing.setdefault(p.table, []).append(p)
        after = tomlkit.dumps(doc)
    except Exception as e:  # tomlkit cannot edit every layout TOML allows
        raise UnsafeEdit(_manual(version, wanted, f"the TOML editor failed ({e})")) from e
    if missing:
        after = after.rstrip("\n") + "\n\n" + _tables_text(missing)
    try:
        parsed = tomlload.loads(after)
    except tomlload.TomlLoadError as e:
        raise UnsafeEdit(_manual(version, wanted, f"the edit would not be valid TOML ({e})")) from e
    if parsed != expected:
        raise UnsafeEdit(_manual(version, wanted, "the edit would change other settings"))
    return after


def _tables_text(missing: dict[tuple[str, ...], list[Placement]]) -> str:
    blocks = []
    for table in sorted(missing, key=len):  # parent tables before their subtables
        name = ".".join(_toml_key(n) for n in table)
        body = "".join(f"  {p.key} = {_toml_value(p.value)}\n" for p in missing[table])
        blocks.append(f"[{name}]\n{body}")
    return "\n".join(blocks)


def _toml_key(name: str) -> str:
    bare = name.replace("_", "").replace("-", "").isalnum() and name.isascii()
    return name if bare else tomlkit.string(name).as_string()


def _toml_value(value: str | bool) -> str:
    return tomlkit.item(value).as_string()


def _manual(version: int, wanted: Sequence[Placement], why: str) -> str:
    snippet = config_snippet(version, **{p.key: p.value for p in wanted})  # type: ignore[arg-type]
    return f"cannot edit the containerd config safely: {why}; add this by hand:\n{snippet}"


# --- plan ----------------------------------------------------------------------------------------


def _read_text(node: Node, path: str) -> str | None:
    try:
        data = fsutil.read_file(node.path(path), tomlload.MAX_BYTES)
    except FileNotFoundError:
        return None
    except IsADirectoryError as e:
        raise Refused(f"cannot edit {path}: it is a directory") from e
    except OSError as e:
        raise fsutil.refuse_os_error(e, f"read {path}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Refused(f"cannot edit {path}: it is not UTF-8 text") from e


def plan_setup(
    node: Node, layout: Layout, hosts_dir: str, *, override: str = "", mirror_urls: Sequence[str]
) -> SetupPlan:
    """What configure-containerd would write (reads only)."""
    refusal = _refusal(layout, hosts_dir, mirror_urls)
    if refusal is not None:
        raise refusal
    record = flavor_record(layout.flavor)
    if not record.configurable:  # no refusal above, nor editable
        raise Refused(f"configure-containerd does not know how to configure {layout.flavor}")
    config_file = layout.containerd_config or record.config
    config = layout.config if layout.config and layout.config.path == config_file else None
    if config is None and node.path(config_file).exists():  # detection did not parse it
        config = read_containerd_config(node, config_file)
    _check_config(config, hosts_dir, override)
    config_path = config.config_path if config and hosts_dir in config.hosts_dirs else hosts_dir
    assert config_path is not None
    notes: list[str] = []
    service = _service(node, record)
    dropin = managed_dropin(node, config_file)
    if dropin is not None:
        version, note = _dropin_version(node, dropin)
        notes += [note] if note else []
        after = edit_config_text(None, version, placements(version, config_path))
        before = _read_text(node, dropin.path)
        return SetupPlan(
            layout.flavor, dropin.path, version, before, after, config_path, service, tuple(notes)
        )
    if config is None:
        path, version = config_file, NEW_FILE_VERSION
        notes.append(f"{path} did not exist: created it with version = {version}")
    else:
        path, version = target_file(node, config), config.version
        if path != config.path:
            notes.append(
                f"{path} is the last file containerd loads with a CRI table (it replaces the "
                "table of earlier files on containerd 1.x): the settings go there"
            )
    before = _read_text(node, path)
    after = edit_config_text(before, version, placements(version, config_path))
    return SetupPlan(
        layout.flavor, path, version, before, after, config_path, service, tuple(notes)
    )


# --- apply ---------------------------------------------------------------------------------------


def _write(node: Node, change: FileChange) -> None:
    """The planned edit, unless the file changed since it was read (then: refused, run again)."""
    host_path = node.path(change.path)
    try:
        host_path.parent.mkdir(mode=fsutil.DIR_MODE, parents=True, exist_ok=True)
        if host_path.is_symlink():
            raise Refused(f"cannot edit {change.path}: it is a symlink (edit its target instead)")
        mode = None if change.before is not None else CONFIG_MODE
        with fsutil.open_dir(host_path.parent) as dir_fd:
            done = fsutil.replace_at(dir_fd, host_path.name, change.before, change.after, mode=mode)
    except OSError as e:
        raise fsutil.refuse_os_error(e, f"write {change.path}") from e
    if not done:
        raise Refused(f"{change.path} changed while configure-containerd ran; run it again")


def process_start_time(pid: int) -> float | None:
    """When process `pid` started, wall clock, to a clock tick (None if it cannot be read).

    psutil's create_time adds the start tick to /proc/stat's btime, which has whole-second
    resolution: a containerd restarted within a second of a config write could look older than
    the file. Here the start is measured back from now: uptime minus the process's start tick.
    """
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    fields = stat_line.rpartition(")")[2].split()
    try:
        start_ticks = int(fields[19])  # field 22 of /proc/PID/stat; fields[0] is field 3
    except (IndexError, ValueError):
        return None
    age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def _process_started_before(node: Node, plan: SetupPlan, config_file: str) -> str:
    """On a live root: why the running containerd has not loaded the file yet ("" = it has)."""
    if not node.is_live:
        return ""
    import psutil

    try:
        mtime = os.stat(node.path(plan.path)).st_mtime
    except OSError:
        return ""
    try:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            parsed = parse_containerd_cmdline(proc.info.get("cmdline") or [], proc.info.get("pid"))
            if parsed is None or parsed.pid is None:
                continue
            if flavor_record(plan.flavor).dropin is None and parsed.effective_config != config_file:
                continue
            started = process_start_time(parsed.pid)
            if started is not None and started < mtime - START_SLACK_S:
                return f"containerd (pid {parsed.pid}) started before {plan.path} last changed"
    except (psutil.Error, OSError):
        return ""
    return ""


def configure_containerd(
    node: Node,
    layout: Layout,
    hosts_dir: str,
    *,
    override: str = "",
    mirror_urls: Sequence[str] = (),
    dry_run: bool = False,
) -> SetupOutcome:
    """Plan, and unless `dry_run` write, the containerd settings Spegel needs."""
    plan = plan_setup(node, layout, hosts_dir, override=override, mirror_urls=mirror_urls)
    config_file = layout.containerd_config or flavor_record(layout.flavor).config
    notes: list[str] = []
    if plan.changed and not dry_run:
        _write(node, plan.file)
        dropin = flavor_record(layout.flavor).dropin
        if dropin is None or plan.path != dropin.path:
            check = read_containerd_config(node, config_file)
            if plan.config_path != check.config_path or check.discard_unpacked_layers is not False:
                notes.append(
                    f"after the write, {config_file} reads as config_path="
                    f"{check.config_path!r}, discard_unpacked_layers="
                    f"{check.discard_unpacked_layers!r}: check its imports"
                )
    if plan.changed:
        return SetupOutcome(plan, dry_run, True, f"{plan.path} changed", tuple(notes))
    reason = _process_started_before(node, plan, config_file)
    return SetupOutcome(plan, dry_run, bool(reason), reason, tuple(notes))


# --- report --------------------------------------------------------------------------------------


def setup_report(outcome: SetupOutcome, output: str) -> None:
    """JSON (`changed`, `path`, `restart_required`, ...) or a few plain lines."""
    import sys

    from spegel_node.output import print_json

    if output == "json":
        print_json(outcome.to_json())
        return
    plan = outcome.plan
    settings = f'config_path = "{plan.config_path}", discard_unpacked_layers = false'
    if plan.changed:
        verb = "would write" if outcome.dry_run else "wrote"
        print(f"{verb} {plan.path}: {settings}")
        if outcome.dry_run:
            sys.stdout.write(plan.diff())
    else:
        print(f"{plan.path} already sets {settings}; nothing to change")
    for note in (*plan.notes, *outcome.notes):
        print(f"note: {note}", file=sys.stderr)
    if outcome.restart_required:
        when = "then " if outcome.dry_run and plan.changed else ""
        print(f"{when}restart containerd to load it: systemctl restart {plan.service}")

"""containerd's own config: the CRI settings that decide whether hosts.toml files are read.

Reads the main file, follows `imports` (globs, relative paths) the way containerd does, and
merges the files in containerd's order. Only the few settings spegel-node cares about are kept:
`config_path`, `discard_unpacked_layers`, `use_local_image_pull`, the deprecated
`registry.mirrors`, `root` and the gRPC `address`.

Merge rules (containerd issue #5837, PR #9982):
- containerd 1.x replaces a whole plugin table when a later file sets it: an import that
  configures any CRI table drops `config_path` set by an earlier file.
- containerd 2.x merges plugin tables key by key.
The containerd version is not known from the files, so the main file's `version` stands in:
version 3 (containerd 2.x only) merges key by key, versions 1 and 2 replace whole CRI tables.
k0s: a k0s-managed `containerd.toml` gets the CRI drop-ins of the sibling `containerd.d/`
merged key by key (k0s writes them into its generated CRI file as merge patches).
"""

from __future__ import annotations

import glob
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spegel_node import fsutil, tomlload
from spegel_node.errors import SpegelNodeError
from spegel_node.flavors import FLAVORS, ConfigDropin
from spegel_node.node import Node

DEFAULT_ROOT = "/var/lib/containerd"
CONTENT_PLUGIN = "io.containerd.content.v1.content"
V2_CRI = "io.containerd.grpc.v1.cri"  # containerd 1.x CRI plugin (config versions 1-2)
V1_CRI = "cri"  # the same plugin's short name in version-1 files
V3_IMAGES = "io.containerd.cri.v1.images"  # containerd 2.x CRI image service (versions 3-4)
GRPC_PLUGIN = "io.containerd.server.v1.grpc"  # version 4 (2.3+): the gRPC server's own plugin
KNOWN_VERSIONS = (1, 2, 3, 4)  # 4: containerd 2.3+ (`containerd config default` writes it)
_CRI_KEYS = ("config_path", "discard_unpacked_layers", "use_local_image_pull", "registry_mirrors")


class ContainerdConfigError(SpegelNodeError):
    """A containerd config file that cannot be read or is not valid (one line, node path)."""


@dataclass(frozen=True)
class ContainerdConfig:
    path: str  # node path of the main file
    version: int  # the main file's `version` (1 when absent, as containerd)
    config_path: str | None  # CRI registry config_path as written (may be a ':' list)
    discard_unpacked_layers: bool | None
    use_local_image_pull: bool | None
    registry_mirrors: bool  # the deprecated registry.mirrors table is non-empty
    root: str | None  # containerd `root`; None = containerd's default
    sources: tuple[str, ...]  # every file read, in merge order
    address: str | None = None  # [grpc] address, when a file sets it
    missing_imports: tuple[str, ...] = field(default=())  # named imports that do not exist
    # (containerd refuses to start with a missing named import; globs may match nothing)

    @property
    def hosts_dirs(self) -> tuple[str, ...]:
        """The config_path roots in containerd's search order (empty entries dropped)."""
        return tuple(p for p in (self.config_path or "").split(":") if p)

    @property
    def content_dir(self) -> str:
        return content_dir(self.root or DEFAULT_ROOT)


def content_dir(root: str) -> str:
    """Where containerd under `root` keeps its content store (what Spegel serves from)."""
    return posixpath.join(root, CONTENT_PLUGIN)


@dataclass(frozen=True)
class _File:
    """What one file contributes: top-level values and CRI values it actually sets."""

    path: str
    version: int
    imports: tuple[str, ...]
    top: dict[str, str]  # "root", "address" when set and non-empty
    cri_table: bool  # the file has a CRI image table (replaces the earlier one on 1.x)
    cri: dict[str, Any]  # subset of _CRI_KEYS


def read_containerd_config(node: Node, path: str) -> ContainerdConfig:
    """Read the containerd config at node path `path`, with its imports, merged."""
    main = _parse(path, _load(node, path))
    deep = main.version >= 3
    files, missing = _with_imports(node, main)
    state: dict[str, Any] = {}
    for f in files:
        _merge(state, f, deep=deep)
    dropin = managed_dropin(node, path)
    if dropin is not None:
        loaded = {f.path for f in files}
        pattern = posixpath.join(posixpath.dirname(dropin.path), "*.toml")
        patches = [_parse(p, _load(node, p)) for p in _glob(node, pattern) if p not in loaded]
        for f in patches:
            _merge(state, f, deep=True)
        files += patches
    return ContainerdConfig(
        path=path,
        version=main.version,
        config_path=state.get("config_path") or None,
        discard_unpacked_layers=state.get("discard_unpacked_layers"),
        use_local_image_pull=state.get("use_local_image_pull"),
        registry_mirrors=bool(state.get("registry_mirrors", False)),
        root=state.get("root"),
        sources=tuple(f.path for f in files),
        address=state.get("address"),
        missing_imports=tuple(missing),
    )


def config_snippet(
    version: int,
    *,
    config_path: str | None = None,
    discard_unpacked_layers: bool | None = None,
    use_local_image_pull: bool | None = None,
) -> str:
    """The TOML an operator adds to a config of `version` to set these values ("" if none).

    If the file already has one of these tables, the keys belong in the existing table
    (TOML does not allow a table twice).
    """
    if version not in KNOWN_VERSIONS:
        raise ValueError(f"containerd config version must be 1, 2, 3 or 4, got {version}")
    discard = _pairs(discard_unpacked_layers=discard_unpacked_layers)
    registry = _pairs(config_path=config_path)
    if version >= 3:
        images = f'plugins."{V3_IMAGES}"'
        local = _pairs(use_local_image_pull=use_local_image_pull)
        tables = [(images, discard + local), (f"{images}.registry", registry)]
    elif use_local_image_pull is not None:
        raise ValueError("use_local_image_pull exists only in version 3+ configs (containerd 2.1+)")
    else:
        cri = V1_CRI if version == 1 else f'"{V2_CRI}"'
        tables = [(f"plugins.{cri}.registry", registry), (f"plugins.{cri}.containerd", discard)]
    blocks = [_table(name, pairs) for name, pairs in tables if pairs]
    return "\n".join(blocks)


# --- reading -----------------------------------------------------------------------------------


def _fail(path: str, why: str) -> ContainerdConfigError:
    return ContainerdConfigError(f"containerd config {path}: {' '.join(why.split())}")


def _load(node: Node, path: str) -> dict[str, Any]:
    try:
        raw = fsutil.read_file(node.path(path), tomlload.MAX_BYTES)
    except FileNotFoundError as e:
        raise _fail(path, "does not exist") from e
    except IsADirectoryError as e:
        raise _fail(path, "is a directory") from e
    except OSError as e:
        raise _fail(path, f"cannot be read: {e.strerror}") from e
    try:
        return tomlload.loads(raw)
    except tomlload.TomlLoadError as e:
        raise _fail(path, f"is {e}") from e


def _get(path: str, table: dict[str, Any], key: str, want: type, where: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        kind = {
            dict: "a table",
            str: "a string",
            bool: "true or false",
            int: "an integer",
            list: "a list",
        }[want]
        raise _fail(path, f"{where}{key} must be {kind}, got {value!r}")
    return value


def _parse(path: str, data: dict[str, Any], layout_version: int | None = None) -> _File:
    """One file's values. `layout_version`: the version whose plugin names count (containerd 1.x
    reads an imported file's plugins by the main file's version, whatever the import says)."""
    version = _get(path, data, "version", int, "") or 1
    if version not in KNOWN_VERSIONS:
        raise _fail(path, f"unsupported config version {version} (containerd knows 1, 2, 3 and 4)")
    imports = _get(path, data, "imports", list, "") or []
    if not all(isinstance(i, str) for i in imports):
        raise _fail(path, f"imports must be a list of strings, got {imports!r}")
    top = {"root": _get(path, data, "root", str, "")}
    plugins = _get(path, data, "plugins", dict, "") or {}
    top["address"] = _grpc_address(path, version, data, plugins)
    cri_table, cri = _cri_values(path, layout_version or version, plugins)
    return _File(
        path=path,
        version=version,
        imports=tuple(imports),
        top={k: v for k, v in top.items() if v},
        cri_table=cri_table,
        cri=cri,
    )


def _grpc_address(path: str, version: int, data: dict[str, Any], plugins: dict[str, Any]) -> Any:
    """The socket a file sets: `[grpc] address` up to version 3; in version 4 (containerd
    2.3+) `[plugins."io.containerd.server.v1.grpc"] address`, and a `[grpc]` table there is
    not read (2.3.7's serviceMigrate moves it only when migrating a version 3 file)."""
    if version >= 4:
        server = _get(path, plugins, GRPC_PLUGIN, dict, "[plugins] ") or {}
        return _get(path, server, "address", str, f'[plugins."{GRPC_PLUGIN}"] ')
    grpc = _get(path, data, "grpc", dict, "") or {}
    return _get(path, grpc, "address", str, "[grpc] ")


def _cri_values(path: str, version: int, plugins: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """The CRI values a file sets, from whichever layout it uses.

    Version 3 files: only the 2.x layout counts. Older files: the 1.x layout, and (containerd
    2.x reads them too) a 2.x images table; the 1.x layout wins where both set a key.
    """
    v3 = _get(path, plugins, V3_IMAGES, dict, "[plugins] ")
    values = _v3_values(path, v3) if v3 is not None else {}
    if version >= 3:
        return v3 is not None, values
    # containerd 1.6 reads the CRI plugin by its short name in version-1 files (ignoring the full
    # name there) and by its full name in version-2 files, where a short name stops it from
    # starting ("invalid plugin key URI"); both checked with `containerd config dump`.
    if version == 2 and (short := next((k for k in plugins if "." not in k), None)):
        raise _fail(
            path,
            f'plugin key "{short}" is not valid in a version 2 config (containerd will not '
            'start: "invalid plugin key URI"); use the full name, e.g. "io.containerd.grpc.v1.cri"',
        )
    v2 = _get(path, plugins, V1_CRI if version == 1 else V2_CRI, dict, "[plugins] ")
    if v2 is not None:
        values.update(_v2_values(path, v2))
    return v2 is not None or v3 is not None, values


def _registry_values(path: str, table: dict[str, Any], where: str) -> dict[str, Any]:
    registry = _get(path, table, "registry", dict, where) or {}
    where += "registry."
    out: dict[str, Any] = {}
    config_path = _get(path, registry, "config_path", str, where)
    if config_path is not None:
        out["config_path"] = config_path
    mirrors = _get(path, registry, "mirrors", dict, where)
    if mirrors is not None:
        out["registry_mirrors"] = bool(mirrors)
    return out


def _v2_values(path: str, cri: dict[str, Any]) -> dict[str, Any]:
    where = f'[plugins."{V2_CRI}"] '
    out = _registry_values(path, cri, where)
    containerd = _get(path, cri, "containerd", dict, where) or {}
    discard = _get(path, containerd, "discard_unpacked_layers", bool, where + "containerd.")
    if discard is not None:
        out["discard_unpacked_layers"] = discard
    return out


def _v3_values(path: str, images: dict[str, Any]) -> dict[str, Any]:
    where = f'[plugins."{V3_IMAGES}"] '
    out = _registry_values(path, images, where)
    for key in ("discard_unpacked_layers", "use_local_image_pull"):
        value = _get(path, images, key, bool, where)
        if value is not None:
            out[key] = value
    return out


def _merge(state: dict[str, Any], f: _File, *, deep: bool) -> None:
    if f.cri_table and not deep:
        for key in _CRI_KEYS:
            state.pop(key, None)
    state.update(f.cri)
    state.update(f.top)


# --- imports -----------------------------------------------------------------------------------


def _with_imports(node: Node, main: _File) -> tuple[list[_File], list[str]]:
    """The main file and everything it imports, breadth first, as containerd loads them."""
    files: list[_File] = []
    missing: list[str] = []
    pending: list[_File | str] = [main]
    loaded: set[str] = set()
    while pending:
        item = pending.pop(0)
        path = item.path if isinstance(item, _File) else item
        if path in loaded:
            continue
        layout = main.version if main.version < 3 else None  # 2.x migrates each file itself
        f = item if isinstance(item, _File) else _parse(path, _load(node, path), layout)
        loaded.add(path)
        files.append(f)
        found, absent = _resolve_imports(node, path, f.imports)
        pending.extend(found)
        missing.extend(a for a in absent if a not in missing)
    return files, missing


def _resolve_imports(
    node: Node, parent: str, imports: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """Imported files (node paths, globs expanded and sorted) and named files that are absent.

    As containerd 1.7+/2.x: relative entries are relative to the importing file's directory
    (containerd 1.6 resolved relative globs against its working directory).
    """
    base = posixpath.dirname(parent)
    found: list[str] = []
    missing: list[str] = []
    for entry in imports:
        path = posixpath.normpath(posixpath.join(base, entry))
        if "*" in path:  # containerd globs only patterns with a "*"
            found.extend(_glob(node, path))
        elif node.path(path).is_file():
            found.append(path)
        else:
            missing.append(path)
    return found, missing


def _glob(node: Node, pattern: str) -> list[str]:
    matches = sorted(glob.glob(str(node.path(pattern))))
    return [node.display(m) for m in matches if Path(m).is_file()]


def managed_dropin(node: Node, path: str) -> ConfigDropin | None:
    """The drop-ins a distro merges into `path`, when `path` is the config it generates (k0s).
    Only a flavor's own config path is read again, for its marker line."""
    dropins = [r.dropin for r in FLAVORS.values() if r.dropin and r.config == path]
    if not dropins:
        return None
    try:
        data = fsutil.read_file(node.path(path), tomlload.MAX_BYTES)
    except OSError:
        return None
    stripped = {line.rstrip() for line in data.decode("utf-8", "replace").splitlines()}
    return next((d for d in dropins if d.managed_marker in stripped), None)


# --- writing snippets --------------------------------------------------------------------------


def _pairs(**values: str | bool | None) -> list[tuple[str, str | bool]]:
    return [(k, v) for k, v in values.items() if v is not None]


def _table(name: str, pairs: list[tuple[str, str | bool]]) -> str:
    body = "".join(f"  {key} = {_toml_value(value)}\n" for key, value in pairs)
    return f"[{name}]\n{body}"


def _toml_value(value: str | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'

"""Pure planning: from what the hosts dir holds and what the settings want, the changes to make.

Nothing here reads or writes the node; `hostsdir.scan` takes the snapshot, `apply.execute` writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from spegel_node import hoststoml
from spegel_node.changes import FileChange
from spegel_node.hostsdir_rules import HOSTS_TOML, MAX_HOSTS_TOML, managed_dirs
from spegel_node.hoststoml import HostsTomlError, MirrorHost
from spegel_node.record import FileRecord, Record, digest
from spegel_node.registry import Registry, registry_for_host


@dataclass(frozen=True)
class DirEntry:
    """One entry of the hosts dir as found on disk."""

    name: str
    kind: str  # "dir", "symlink", "file", "other"
    hosts_toml_kind: str = "missing"  # "file", "symlink", "dir", "other", "too_large",
    # "unreadable", "missing"
    hosts_toml: bytes | None = None


@dataclass(frozen=True)
class HostsSnapshot:
    hosts_dir: str  # node path
    exists: bool
    entries: dict[str, DirEntry] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    dir_name: str
    server: str | None  # None for _default


@dataclass(frozen=True)
class HostsChange:
    """One registry dir's hosts.toml to change, with what the dir itself needs."""

    dir_name: str
    action: str  # "create", "update", "restore", "strip", "delete"
    before: bytes | None
    after: bytes | None
    create_dir: bool = False
    remove_dir: bool = False  # remove the dir when it is empty afterwards

    @property
    def key(self) -> str:
        return f"{self.dir_name}/{HOSTS_TOML}"

    def file(self, hosts_dir: str) -> FileChange:
        return FileChange(
            f"{hosts_dir.rstrip('/')}/{self.key}", self.before, self.after, self.action
        )

    def diff(self, hosts_dir: str) -> str:
        """A unified diff with header values redacted."""
        return self.file(hosts_dir).diff()


@dataclass(frozen=True)
class Plan:
    hosts_dir: str
    changes: tuple[HostsChange, ...]
    record: Record | None  # the record to save after the changes; None: delete it
    problems: tuple[str, ...] = ()  # targets skipped, each one line (exit 1)
    notes: tuple[str, ...] = ()


def targets(registries: Sequence[Registry], snapshot: HostsSnapshot) -> list[Target]:
    """The registry dirs to manage (hostsdir_rules.managed_dirs), each with its `server`."""
    by_host = {r.host: r for r in registries}
    entries = {n: e.kind in ("dir", "symlink") for n, e in snapshot.entries.items()}
    return [
        Target(
            d.dir_name,
            None if d.host is None else by_host.get(d.host, registry_for_host(d.host)).upstream,
        )
        for d in managed_dirs([r.host for r in registries], entries)
    ]


def _unsafe(entry: DirEntry | None, hosts_dir: str) -> str | None:
    if entry is None:
        return None
    path = f"{hosts_dir}/{entry.name}"
    if entry.kind == "symlink":
        return f"{path} is a symlink; refusing to write through it (replace it with a directory)"
    if entry.kind != "dir":
        return f"{path} is not a directory; move it aside"
    if entry.hosts_toml_kind == "symlink":
        return f"{path}/{HOSTS_TOML} is a symlink; refusing to write through it (replace it with a file)"
    if entry.hosts_toml_kind == "too_large":
        return (
            f"{path}/{HOSTS_TOML} is larger than {MAX_HOSTS_TOML >> 20} MiB; left alone "
            "(run `spegel-node validate`)"
        )
    if entry.hosts_toml_kind == "unreadable":
        return f"cannot read {path} or its {HOSTS_TOML} (check its permissions)"
    if entry.hosts_toml_kind not in ("file", "missing"):
        return f"{path}/{HOSTS_TOML} is not a regular file; move it aside"
    return None


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HostsTomlError("not UTF-8 text") from e  # callers prefix the path


def _undo(
    snapshot: HostsSnapshot, key: str, rec: FileRecord, urls: Sequence[str]
) -> tuple[HostsChange | None, str | None]:
    """Give one file back: its baseline when it still holds what apply last wrote (deleted when
    apply created it), else the file as it now is without the Spegel host tables.
    Returns the change (None: nothing to do) and a problem (the record entry is then kept)."""
    dir_name = key.split("/", 1)[0]
    entry = snapshot.entries.get(dir_name)
    if why := _unsafe(entry, snapshot.hosts_dir):
        return None, why
    current = entry.hosts_toml if entry else None
    if current is None:
        if entry is not None and rec.created and rec.created_dir:
            # the file is gone (a remove killed before its rmdir): still remove the empty
            # dir apply made, as it would hide _default from containerd
            return HostsChange(dir_name, "delete", None, None, remove_dir=True), None
        return None, None
    if rec.holds_last_write(current):
        if rec.created:
            return HostsChange(dir_name, "delete", current, None, remove_dir=rec.created_dir), None
        baseline = rec.baseline
        if baseline is not None and baseline != current:
            return HostsChange(dir_name, "restore", current, baseline), None
        return None, None
    try:
        text = _decode(current)
        stripped = hoststoml.strip(text, urls)
    except HostsTomlError as e:
        return None, f"{snapshot.hosts_dir}/{key}: {e}"
    if stripped != text:
        return HostsChange(dir_name, "strip", current, stripped.encode()), None
    return None, None


def plan_apply(
    snapshot: HostsSnapshot,
    registries: Sequence[Registry],
    mirrors: Sequence[MirrorHost],
    record: Record,
    advertise: bool = True,
) -> Plan:
    """Make every target's hosts.toml list `mirrors` first (or, with advertise False, list none),
    re-base files a third party changed since the last write, and give back the files of
    registries no longer mirrored."""
    urls = tuple(m.url for m in mirrors)
    spegel = tuple(dict.fromkeys((*record.mirror_urls, *urls)))  # every URL that is Spegel's
    retired = [u for u in spegel if u not in urls]
    files = dict(record.files)
    changes: list[HostsChange] = []
    problems: list[str] = []
    wanted_keys: set[str] = set()
    for target in targets(registries, snapshot):
        entry = snapshot.entries.get(target.dir_name)
        key = f"{target.dir_name}/{HOSTS_TOML}"
        wanted_keys.add(key)
        path = f"{snapshot.hosts_dir}/{key}"
        if why := _unsafe(entry, snapshot.hosts_dir):
            problems.append(why)
            continue
        current = entry.hosts_toml if entry else None
        previous = record.files.get(key)
        if current is None:
            if not advertise:
                continue
            after = hoststoml.render_managed(target.server, mirrors).encode()
            changes.append(
                HostsChange(target.dir_name, "create", None, after, create_dir=entry is None)
            )
            created_dir = entry is None or (previous is not None and previous.created_dir)
            files[key] = FileRecord.make(True, created_dir, None, after)
            continue
        try:
            text = _decode(current)
            baseline: bytes | None
            if previous is None:  # first apply: the file as it is, byte for byte
                baseline, created = current, False
            elif previous.holds_last_write(current):
                baseline, created = previous.baseline, previous.created
            else:  # a third party wrote it since: theirs, without the Spegel tables
                baseline, created = hoststoml.strip(text, spegel).encode(), False
            base = hoststoml.strip(text, retired) if retired else text
            new = hoststoml.merge(base, mirrors) if advertise else hoststoml.strip(base, urls)
        except HostsTomlError as e:
            problems.append(f"{path}: {e} (containerd ignores this file; fix or remove it)")
            continue
        created_dir = previous is not None and previous.created_dir
        if new != text:  # ours too, until the write lands
            prior = digest(current)
        else:  # nothing to write: the record stays as it was (no rewrite each minute)
            prior = (
                previous.prior_sha256 if previous and previous.holds_last_write(current) else None
            )
        files[key] = FileRecord.make(created, created_dir, baseline, new.encode(), prior)
        if new != text:
            changes.append(HostsChange(target.dir_name, "update", current, new.encode()))
    for key, rec in sorted(record.files.items()):
        if key in wanted_keys:
            continue
        change, problem = _undo(snapshot, key, rec, spegel)
        if problem is not None:
            problems.append(problem)
            continue
        del files[key]
        if change is not None:
            changes.append(change)
    new_record = Record(
        hosts_dir=snapshot.hosts_dir, mirror_urls=urls, files=files, gate=record.gate
    )
    return Plan(snapshot.hosts_dir, tuple(changes), new_record, tuple(problems))


def plan_remove(snapshot: HostsSnapshot, record: Record, also_urls: Sequence[str] = ()) -> Plan:
    """Undo apply: restore baselines of files that still hold what apply wrote, strip the Spegel
    host tables from files changed since, delete files and dirs apply created that nobody changed.
    `also_urls`: the mirror URLs of the current config, Spegel's too."""
    changes: list[HostsChange] = []
    problems: list[str] = []
    kept: dict[str, FileRecord] = {}  # entries that could not be undone stay on record
    urls = tuple(dict.fromkeys((*record.mirror_urls, *also_urls)))
    for key, rec in sorted(record.files.items()):
        change, problem = _undo(snapshot, key, rec, urls)
        if problem is not None:
            problems.append(problem)
            kept[key] = rec
        elif change is not None:
            changes.append(change)
    remaining = record.with_files(kept) if kept else None
    return Plan(snapshot.hosts_dir, tuple(changes), remaining, tuple(problems))

"""Apply and remove: the only code that writes to the node.

detect -> settings -> snapshot -> plan (pure) -> write under the lock -> outcome for the report.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from spegel_node import fsutil, gate, hostsdir, preflight, state
from spegel_node.errors import Refused, SpegelNodeError
from spegel_node.flavors import FALLBACK_HOSTS_DIR
from spegel_node.gate import ProbeResult
from spegel_node.hostsdir_rules import HOSTS_TOML, MAX_HOSTS_TOML
from spegel_node.hoststoml import MirrorHost
from spegel_node.instructions import distro_owned_message
from spegel_node.layout import Layout
from spegel_node.node import STATE_DIR, Node
from spegel_node.nodeip import resolve_node_ip
from spegel_node.plan import HostsChange, Plan, plan_apply, plan_remove
from spegel_node.record import GateState, Record
from spegel_node.settings import Settings

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Outcome:
    command: str  # "apply" or "remove"
    plan: Plan
    dry_run: bool
    mirror_urls: tuple[str, ...]
    gate: GateState | None = None
    probe: ProbeResult | None = None
    warnings: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        return 1 if self.plan.problems else 0


def hosts_dir_of(layout: Layout) -> str:
    return layout.hosts_dir or FALLBACK_HOSTS_DIR


def mirror_hosts(settings: Settings) -> list[MirrorHost]:
    node_ip = resolve_node_ip(settings.node_ip)
    return [
        MirrorHost(url, settings.capabilities, settings.dial_timeout)
        for url in settings.mirror_urls(node_ip)
    ]


def _layout_warnings(layout: Layout, hosts_dir: str) -> tuple[str, ...]:
    if layout.config_path_set:
        return ()
    return (
        f"containerd on this node does not set config_path, so it will not read {hosts_dir} "
        "until it does; run `spegel-node doctor` for the exact setting",
    )


@contextlib.contextmanager
def _locked(node: Node, dry_run: bool) -> Iterator[None]:
    if dry_run:  # a dry run writes nothing, not even the lock file
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            lock = state.lock_path(node)
        except OSError as e:
            raise fsutil.refuse_os_error(e, f"create state dir {STATE_DIR}") from e
        try:
            stack.enter_context(fsutil.exclusive_lock(lock))
        except OSError as e:
            raise fsutil.refuse_os_error(e, f"lock {STATE_DIR}/{state.LOCK_FILE}") from e
        yield


def _check_record_dir(record: Record, hosts_dir: str) -> None:
    if record.files and record.hosts_dir and record.hosts_dir != hosts_dir:
        raise Refused(
            f"the last apply wrote under {record.hosts_dir}, but the hosts dir is now {hosts_dir}; "
            f"run `spegel-node remove --hosts-dir {record.hosts_dir}` first"
        )


def _gate_step(
    record: Record,
    settings: Settings,
    mirror_url: str,
    use_gate: bool,
    dry_run: bool,
    reprobe: bool = True,
) -> tuple[GateState, ProbeResult | None]:
    if not use_gate:
        return replace(record.gate, withdrawn=False, consecutive_failures=0), None
    if not reprobe:  # `run` repairing a change: keep the gate its last probe decided
        return record.gate, None
    probe = gate.probe_v2(mirror_url)
    after = gate.next_gate_state(record.gate, probe, settings.gate_failures)
    if not dry_run:
        gate.log_transition(record.gate, after, mirror_url)
    return after, probe


def _worth_saving(old: Record, new: Record) -> bool:
    """Skip rewriting the record when only the probe time moved (the timer runs every minute)."""
    return replace(old, gate=replace(old.gate, last_probe_at=None)) != replace(
        new, gate=replace(new.gate, last_probe_at=None)
    )


def apply_mirrors(
    node: Node,
    layout: Layout,
    settings: Settings,
    *,
    dry_run: bool = False,
    use_gate: bool = True,
    reprobe: bool = True,
) -> Outcome:
    """`reprobe=False` (the reconciler repairing a change) applies with the gate as the last
    probe left it, so a repair never waits on a probe timeout."""
    mirrors = mirror_hosts(settings)
    urls = tuple(m.url for m in mirrors)
    if layout.distro_owned:
        raise Refused(distro_owned_message(layout.flavor, settings.registries, urls))
    hosts_dir = hosts_dir_of(layout)
    facts = preflight.containerd_facts(node, layout, settings, urls)
    refusal = preflight.ipv6_refusal(facts, urls) if facts is not None else None
    if refusal is not None:
        raise refusal
    with _locked(node, dry_run):
        record = state.load_record(node)
        _check_record_dir(record, hosts_dir)
        gate_state, probe = _gate_step(record, settings, urls[0], use_gate, dry_run, reprobe)
        snapshot = hostsdir.scan(node.real_path(hosts_dir), hosts_dir)
        plan = plan_apply(
            snapshot, settings.registries, mirrors, record, advertise=not gate_state.withdrawn
        )
        new_record = replace(plan.record or Record(), gate=gate_state)
        plan = replace(plan, record=new_record)
        skipped: list[str] = []
        if not dry_run:
            # Until every change is done, the record keeps what a run killed meanwhile leaves
            # for the next apply or remove to finish: the files given back (registries no longer
            # mirrored), and the old mirror URLs too (files not yet rewritten hold their tables).
            dropped = {k: r for k, r in record.files.items() if k not in new_record.files}
            undoing = {c.key for c in plan.changes} & set(dropped)
            old_too = tuple(dict.fromkeys((*record.mirror_urls, *new_record.mirror_urls)))
            before = replace(
                new_record.with_files(
                    {**new_record.files, **{k: dropped[k] for k in sorted(undoing)}}
                ),
                mirror_urls=old_too,
            )
            if _worth_saving(record, before):
                _save(node, before)
            result = execute(node, plan)
            _remove_temp_files(node, hosts_dir, {k.split("/", 1)[0] for k in dropped})
            skipped = [line for _, line in result.skipped]
            if result.not_done or undoing or old_too != new_record.mirror_urls:
                files = dict(new_record.files)
                for key in result.not_done:  # files not done are as they were: so is their entry
                    if key in record.files:
                        files[key] = record.files[key]
                    else:
                        files.pop(key, None)
                urls_now = old_too if result.not_done else new_record.mirror_urls
                _save(node, replace(new_record.with_files(files), mirror_urls=urls_now))
            plan = replace(plan, problems=(*plan.problems, *(line for _, line in result.failed)))
    local_pull = preflight.local_pull_warning(facts, hosts_dir) if facts is not None else ""
    warnings = (
        *_layout_warnings(layout, hosts_dir),
        *((local_pull,) if local_pull else ()),
        *preflight.regenerated_warnings(node, layout, plan, urls),
        *skipped,
    )
    return Outcome("apply", plan, dry_run, urls, gate_state, probe, warnings)


def _config_urls(settings: Settings) -> tuple[str, ...]:
    try:
        return tuple(m.url for m in mirror_hosts(settings))
    except SpegelNodeError:  # node_ip "auto" without an address: the record's URLs suffice
        return ()


def remove_mirrors(
    node: Node, layout: Layout, settings: Settings, *, dry_run: bool = False
) -> Outcome:
    with _locked(node, dry_run):
        record = state.load_record(node)
        hosts_dir = record.hosts_dir or hosts_dir_of(layout)
        snapshot = hostsdir.scan(node.real_path(hosts_dir), hosts_dir)
        plan = plan_remove(snapshot, record, _config_urls(settings))
        skipped: list[str] = []
        if not dry_run:
            result = execute(node, plan)
            _remove_temp_files(node, hosts_dir, {k.split("/", 1)[0] for k in record.files})
            skipped = [line for _, line in result.skipped]
            kept = dict(plan.record.files) if plan.record else {}
            for key in result.not_done:  # judged again by the next remove
                kept[key] = record.files[key]
            if kept:
                _save(node, record.with_files(kept))
            else:
                with contextlib.suppress(FileNotFoundError):
                    state.delete_record(node)
            plan = replace(plan, problems=(*plan.problems, *(line for _, line in result.failed)))
    return Outcome("remove", plan, dry_run, record.mirror_urls, warnings=tuple(skipped))


def _remove_temp_files(node: Node, hosts_dir: str, dir_names: set[str]) -> None:
    """Temp files of runs killed mid-write, in registry dirs remove had nothing to change in
    (execute cleans the others): remove leaves none behind."""
    with contextlib.suppress(OSError), fsutil.open_dir(node.real_path(hosts_dir)) as hosts_fd:
        for name in sorted(dir_names):
            with contextlib.suppress(OSError), fsutil.open_subdir(hosts_fd, name) as dir_fd:
                fsutil.remove_stale_temp_files(dir_fd)


def _save(node: Node, record: Record) -> None:
    try:
        state.save_record(node, record)
    except OSError as e:
        raise fsutil.refuse_os_error(e, f"write the state under {STATE_DIR}") from e


def _ensure_hosts_dir(path: Path, display: str) -> None:
    try:
        fsutil.make_dirs(path)
    except OSError as e:
        raise fsutil.refuse_os_error(e, f"create hosts dir {display}") from e


_NODE_WIDE = (errno.EROFS, errno.ENOSPC, errno.EDQUOT)


class _NodeWide(Refused):
    """A failure of the file system, not of one file: the run stops with one line."""


@dataclass
class ExecResult:
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, line): changed meanwhile
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, line): could not write

    @property
    def not_done(self) -> list[str]:
        return [key for key, _ in (*self.skipped, *self.failed)]


def execute(node: Node, plan: Plan) -> ExecResult:
    """Carry out the plan's file changes: atomic writes, no symlinks followed below the hosts dir.

    A file that changed since the snapshot (k3s restarting, a person saving) is left as it now
    is rather than overwritten with a merge of what it was; the next run merges the new content.
    A file that cannot be written never stops the others: each is listed in `failed`.
    """
    result = ExecResult()
    if not plan.changes:
        return result
    hosts_path = node.real_path(plan.hosts_dir)
    _ensure_hosts_dir(hosts_path, plan.hosts_dir)
    with fsutil.open_dir(hosts_path) as hosts_fd:
        for change in plan.changes:
            where = f"{plan.hosts_dir}/{change.key}"
            try:
                if not _execute_one(hosts_fd, change, where, plan.hosts_dir):
                    result.skipped.append(
                        (
                            change.key,
                            f"{where} changed while apply ran; left as is for the next run",
                        )
                    )
            except _NodeWide:
                raise
            except Refused as e:
                result.failed.append((change.key, str(e)))
    return result


def _execute_one(hosts_fd: int, change: HostsChange, where: str, hosts_dir: str) -> bool:
    """One change; False when the file changed since the snapshot. Refused when it failed."""
    made_dir = False
    try:
        if change.create_dir:
            with contextlib.suppress(FileExistsError):
                fsutil.mkdir_at(hosts_fd, change.dir_name)
                made_dir = True
        with fsutil.open_subdir(hosts_fd, change.dir_name) as dir_fd:
            done = fsutil.replace_at(
                dir_fd, HOSTS_TOML, change.before, change.after, limit=MAX_HOSTS_TOML
            )
            if not done:
                return False
        if change.remove_dir:
            fsutil.rmdir_if_empty_at(hosts_fd, change.dir_name)
        return True
    except OSError as e:
        if made_dir:  # an empty registry dir would hide _default from containerd
            with contextlib.suppress(OSError):
                fsutil.rmdir_if_empty_at(hosts_fd, change.dir_name)
        st = None
        with contextlib.suppress(OSError):
            st = fsutil.lstat_at(hosts_fd, change.dir_name)
        if st is not None and stat.S_ISLNK(st.st_mode):  # swapped in since the scan
            raise Refused(
                f"cannot write {where}: {hosts_dir}/{change.dir_name} is a symlink "
                "(refusing to follow it)"
            ) from e
        if e.errno == errno.ENOENT:
            gone = Refused(f"cannot write {where}: the directory vanished; run apply again")
            with contextlib.suppress(OSError):
                if os.fstat(hosts_fd).st_nlink == 0:  # the whole hosts dir went away
                    gone = _NodeWide(str(gone))
            raise gone from e
        refused = fsutil.refuse_os_error(e, f"write {where}")
        if e.errno in _NODE_WIDE:  # every other file would fail the same way: one line, stop
            raise _NodeWide(str(refused)) from e
        raise refused from e

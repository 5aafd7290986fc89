"""The record of what apply did, so remove can undo it and doctor can see drift.

Kept as one JSON file under /var/lib/spegel-node/ (0600: originals may hold credentials).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from spegel_node import fsutil
from spegel_node.errors import Refused
from spegel_node.node import STATE_DIR, Node

STATE_FILE = "state.json"
LOCK_FILE = "lock"
FORMAT = 1


def digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """One hosts.toml apply manages, keyed by its path relative to the hosts dir."""

    created: bool  # apply created the file (remove deletes it)
    created_dir: bool  # apply created its directory too (remove deletes it when empty)
    written_sha256: str | None  # what apply last wrote
    original_b64: str | None = None  # the file as it was before the first apply (created=False)

    @property
    def original(self) -> bytes | None:
        return None if self.original_b64 is None else base64.b64decode(self.original_b64)

    @staticmethod
    def for_existing(original: bytes, written: bytes) -> FileRecord:
        return FileRecord(
            created=False,
            created_dir=False,
            written_sha256=digest(written),
            original_b64=base64.b64encode(original).decode("ascii"),
        )


@dataclass(frozen=True)
class GateState:
    consecutive_failures: int = 0
    withdrawn: bool = False
    last_probe_ok: bool | None = None
    last_probe_at: float | None = None
    last_change_at: float | None = None
    last_error: str = ""


@dataclass(frozen=True)
class Record:
    hosts_dir: str = ""  # node path the files below are relative to
    mirror_urls: tuple[str, ...] = ()
    files: dict[str, FileRecord] = field(default_factory=dict)
    gate: GateState = GateState()

    def with_files(self, files: dict[str, FileRecord]) -> Record:
        return replace(self, files=files)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = FORMAT
        data["mirror_urls"] = list(self.mirror_urls)
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> Record:
        return Record(
            hosts_dir=str(data.get("hosts_dir", "")),
            mirror_urls=tuple(data.get("mirror_urls", ())),
            files={k: FileRecord(**v) for k, v in data.get("files", {}).items()},
            gate=GateState(**data.get("gate", {})),
        )


def state_dir(node: Node) -> Path:
    return node.path(STATE_DIR)


def load_record(node: Node) -> Record:
    """The saved record; an empty one when none was saved yet."""
    path = state_dir(node) / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Record()
    except OSError as e:
        raise fsutil.refuse_os_error(e, f"read {node.display(path)}") from e
    try:
        return Record.from_json(json.loads(raw))
    except (ValueError, TypeError, AttributeError) as e:
        raise Refused(
            f"state file {node.display(path)} is corrupt ({e}); move it aside to start over "
            "(remove can then no longer restore originals)"
        ) from e


def save_record(node: Node, record: Record) -> None:
    directory = state_dir(node)
    fsutil.ensure_private_dir(directory)
    data = (json.dumps(record.to_json(), indent=1, sort_keys=True) + "\n").encode()
    with fsutil.open_dir(directory) as fd:
        fsutil.remove_stale_temp_files(fd)  # of a run killed while saving
        fsutil.write_atomic_at(fd, STATE_FILE, data, mode=0o600)


def delete_record(node: Node) -> None:
    with fsutil.open_dir(state_dir(node)) as fd:
        fsutil.unlink_at(fd, STATE_FILE)


def lock_path(node: Node) -> Path:
    directory = state_dir(node)
    fsutil.ensure_private_dir(directory)
    return directory / LOCK_FILE

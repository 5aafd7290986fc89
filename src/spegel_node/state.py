"""The record of what apply did, so remove can undo it and doctor can see drift.

Kept as one JSON file under /var/lib/spegel-node/ (0600: originals may hold credentials).
"""

from __future__ import annotations

import base64
import binascii
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
FORMAT = 2  # 1: original_b64 + written_sha256 only (still read)


def digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class FileRecord:
    """One hosts.toml apply manages, keyed by its path relative to the hosts dir.

    `baseline` is what remove gives back when the file still holds `written`: the file before
    the first apply, re-based to what a third party wrote (minus the Spegel tables) whenever
    apply finds the file changed since its last write. None when apply created the file.
    """

    created: bool  # apply created the file and nobody changed it since (remove deletes it)
    created_dir: bool  # apply created its directory too (remove deletes it when empty)
    written_sha256: str | None  # what apply last wrote
    original_b64: str | None = None  # the baseline (named so since format 1)
    written_b64: str | None = None  # the exact bytes apply last wrote (format 2)
    # what apply wrote before that: a run killed after saving the record but before writing
    # leaves the file holding it, which is still apply's own content, not a third party's
    prior_sha256: str | None = None

    @property
    def original(self) -> bytes | None:
        return None if self.original_b64 is None else base64.b64decode(self.original_b64)

    @property
    def baseline(self) -> bytes | None:
        return self.original

    @property
    def written(self) -> bytes | None:
        return None if self.written_b64 is None else base64.b64decode(self.written_b64)

    def holds_last_write(self, data: bytes | None) -> bool:
        if data is None:
            return False
        found = digest(data)
        return found == self.written_sha256 or (
            self.prior_sha256 is not None and found == self.prior_sha256
        )

    @staticmethod
    def make(
        created: bool,
        created_dir: bool,
        baseline: bytes | None,
        written: bytes,
        prior_sha256: str | None = None,
    ) -> FileRecord:
        return FileRecord(
            created, created_dir, digest(written), _b64(baseline), _b64(written), prior_sha256
        )

    @staticmethod
    def for_existing(original: bytes, written: bytes) -> FileRecord:
        return FileRecord.make(False, False, original, written)


@dataclass(frozen=True)
class GateState:
    consecutive_failures: int = 0
    withdrawn: bool = False
    last_probe_ok: bool | None = None
    last_probe_at: float | None = None
    last_change_at: float | None = None
    last_error: str = ""


class RecordError(ValueError):
    """The record does not match the schema; the message names the field."""


_FILE_FIELDS: dict[str, tuple[type, ...]] = {
    "created": (bool,),
    "created_dir": (bool,),
    "written_sha256": (str, type(None)),
    "original_b64": (str, type(None)),
    "written_b64": (str, type(None)),
    "prior_sha256": (str, type(None)),
}
_GATE_FIELDS: dict[str, tuple[type, ...]] = {
    "consecutive_failures": (int,),
    "withdrawn": (bool,),
    "last_probe_ok": (bool, type(None)),
    "last_probe_at": (int, float, type(None)),
    "last_change_at": (int, float, type(None)),
    "last_error": (str,),
}


def _typed(value: Any, types: tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) and bool not in types:
        raise RecordError(f"{where} has the wrong type")
    if not isinstance(value, types):
        raise RecordError(f"{where} has the wrong type")
    return value


def _fields(
    data: Any, spec: dict[str, tuple[type, ...]], where: str, required: set[str]
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecordError(f"{where} is not an object")
    unknown = sorted(set(data) - set(spec))
    if unknown:
        raise RecordError(f"{where} has an unknown field {unknown[0]!r}")
    missing = sorted(required - set(data))
    if missing:
        raise RecordError(f"{where} lacks the field {missing[0]!r}")
    return {k: _typed(v, spec[k], f"{where}.{k}") for k, v in data.items()}


def _check_b64(value: str | None, where: str) -> None:
    if value is not None:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RecordError(f"{where} is not base64") from e


def _check_key(key: str) -> None:
    name, sep, rest = key.partition("/")
    if (
        sep != "/"
        or rest != "hosts.toml"
        or not name
        or name in (".", "..")
        or "\\" in name
        or "\0" in name
    ):
        raise RecordError(f"files has an entry {key!r} that is not <registry dir>/hosts.toml")


def _file_record(key: str, data: Any) -> FileRecord:
    _check_key(key)
    where = f"files[{key!r}]"
    values = _fields(data, _FILE_FIELDS, where, {"created", "created_dir", "written_sha256"})
    rec = FileRecord(**values)
    _check_b64(rec.original_b64, f"{where}.original_b64")
    _check_b64(rec.written_b64, f"{where}.written_b64")
    if rec.written_b64 is not None and digest(rec.written) != rec.written_sha256:
        raise RecordError(f"{where}.written_sha256 does not match written_b64")
    if not rec.created and rec.original_b64 is None:
        raise RecordError(f"{where} is not created and has no original_b64")
    return rec


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
    def from_json(data: Any) -> Record:
        """The record, checked strictly (RecordError names the first field that is wrong)."""
        if not isinstance(data, dict):
            raise RecordError("the top level is not an object")
        fmt = data.get("format", 1)
        if isinstance(fmt, bool) or fmt not in (1, FORMAT):
            raise RecordError(f"format {fmt!r} is not one this version reads (1 or {FORMAT})")
        unknown = sorted(set(data) - {"format", "hosts_dir", "mirror_urls", "files", "gate"})
        if unknown:
            raise RecordError(f"unknown field {unknown[0]!r}")
        hosts_dir = _typed(data.get("hosts_dir", ""), (str,), "hosts_dir")
        urls = _typed(data.get("mirror_urls", []), (list,), "mirror_urls")
        for i, url in enumerate(urls):
            _typed(url, (str,), f"mirror_urls[{i}]")
        files = _typed(data.get("files", {}), (dict,), "files")
        gate = _fields(data.get("gate", {}), _GATE_FIELDS, "gate", set())
        return Record(
            hosts_dir=hosts_dir,
            mirror_urls=tuple(urls),
            files={k: _file_record(k, v) for k, v in files.items()},
            gate=GateState(**gate),
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
    except (ValueError, TypeError, RecursionError) as e:  # RecordError, JSON, UTF-8
        why = str(e) if isinstance(e, RecordError) else "not valid JSON"
        raise Refused(
            f"state file {node.display(path)} is corrupt ({why}); nothing was changed; fix it, or "
            "move it aside to start over (remove then leaves the Spegel-managed files in place)"
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
        fsutil.remove_stale_temp_files(fd)  # of a run killed while saving
        fsutil.unlink_at(fd, STATE_FILE)


def lock_path(node: Node) -> Path:
    directory = state_dir(node)
    fsutil.ensure_private_dir(directory)
    return directory / LOCK_FILE

"""Where the record of what apply did lives, and its lock: one JSON file under
/var/lib/spegel-node/ (0600: originals may hold credentials), read strictly, written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from spegel_node import fsutil, tomlload
from spegel_node.errors import Refused
from spegel_node.node import STATE_DIR, Node
from spegel_node.record import Record, RecordError

STATE_FILE = "state.json"
LOCK_FILE = "lock"


def state_dir(node: Node) -> Path:
    return node.path(STATE_DIR)


def load_record(node: Node) -> Record:
    """The saved record; an empty one when none was saved yet."""
    path = state_dir(node) / STATE_FILE
    try:
        raw = fsutil.read_file(path, tomlload.MAX_BYTES)
    except FileNotFoundError:
        return Record()
    except OSError as e:
        raise fsutil.refuse_os_error(e, f"read {node.display(path)}") from e
    try:
        return Record.from_json(tomlload.loads_json(raw))
    except (tomlload.LoadError, ValueError, TypeError) as e:  # RecordError is a ValueError
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
        fsutil.replace_at(fd, STATE_FILE, fsutil.UNCHECKED, data, mode=0o600)


def delete_record(node: Node) -> None:
    with fsutil.open_dir(state_dir(node)) as fd:
        fsutil.remove_stale_temp_files(fd)  # of a run killed while saving
        fsutil.unlink_at(fd, STATE_FILE)


def lock_path(node: Node) -> Path:
    directory = state_dir(node)
    fsutil.ensure_private_dir(directory)
    return directory / LOCK_FILE

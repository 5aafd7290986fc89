"""The one change type every writer plans (hosts.toml, unit files, containerd's config): a file's
bytes now and after, shown the same way everywhere (a unified diff with secrets redacted).

`fsutil.replace_at` carries a change out; nothing here touches the node.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from spegel_node.redact import redact_hosts_toml


@dataclass(frozen=True)
class FileChange:
    path: str  # as shown: the node path
    before: bytes | None  # None: the file does not exist
    after: bytes | None  # None: the file is to be deleted
    verb: str = ""  # what the writer calls this change ("restore", "strip"); default by bytes

    @property
    def changed(self) -> bool:
        return self.before != self.after

    @property
    def action(self) -> str:
        if self.verb:
            return self.verb
        if not self.changed:
            return "unchanged"
        if self.before is None:
            return "create"
        return "delete" if self.after is None else "update"

    def diff(self) -> str:
        """A unified diff, header values and credentials redacted; "" when nothing changes."""
        if not self.changed:
            return ""
        before = redact_hosts_toml((self.before or b"").decode("utf-8", "replace"))
        after = redact_hosts_toml((self.after or b"").decode("utf-8", "replace"))
        lines = difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile="/dev/null" if self.before is None else f"a{self.path}",
            tofile="/dev/null" if self.after is None else f"b{self.path}",
        )
        return "".join(line if line.endswith("\n") else line + "\n" for line in lines)

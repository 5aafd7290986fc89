"""Run a containerd version's own hosts.toml judgement (tests/judge/, built by `make peers`).

`judge_texts(version, texts)` writes each text as the hosts.toml of its own registry under one
scratch root and asks that version's ConfigureHosts about all of them in one process.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from support.peers import peer_bin


@dataclass(frozen=True)
class Judgement:
    status: (
        str  # "used", "dropped" (logged and ignored: upstream only), "error" (pull fails), "panic"
    )
    error: str
    hosts: list[tuple[str, tuple[str, ...]]]  # (url, capabilities), in the order tried

    @property
    def rejected(self) -> bool:
        """containerd does not use the file as written: what validate must call an error."""
        return self.status != "used"


def judge_dir(version: str, root: Path, registries: Sequence[str]) -> list[Judgement]:
    """The judgement of `version` for each registry host under hosts root `root`."""
    out = subprocess.run(
        [str(peer_bin("judge", version=version)), str(root), "-"],
        input="".join(f"{r}\n" for r in registries),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = out.stdout.splitlines()
    assert len(lines) == len(registries), out.stderr[-2000:]
    return [_judgement(json.loads(line)) for line in lines]


def judge_texts(version: str, texts: Sequence[bytes]) -> list[Judgement]:
    with tempfile.TemporaryDirectory(prefix="judge-") as tmp:
        root = Path(tmp)
        names = [f"r{i}.test" for i in range(len(texts))]
        for name, text in zip(names, texts, strict=True):
            (root / name).mkdir()
            (root / name / "hosts.toml").write_bytes(text)
        return judge_dir(version, root, names)


def _judgement(raw: dict[str, object]) -> Judgement:
    hosts = raw.get("hosts") or []
    assert isinstance(hosts, list)
    return Judgement(
        status=str(raw["status"]),
        error=str(raw.get("error", "")),
        hosts=[(str(h["url"]), tuple(h["capabilities"])) for h in hosts],
    )

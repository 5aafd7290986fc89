"""`make demo-p2p` (scripts/demo_p2p.py) runs its three-node story once and says so."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.p2p

SCRIPT = Path(__file__).resolve().parent.parent / "scripts/demo_p2p.py"


def test_demo_p2p_states_no_upstream_blob_request_from_b_and_c() -> None:
    spec = importlib.util.spec_from_file_location("demo_p2p", SCRIPT)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    sys.modules["demo_p2p"] = demo
    spec.loader.exec_module(demo)
    lines: list[str] = []
    assert demo.main(lines.append) == 0, "\n".join(lines)
    text = "\n".join(lines)
    assert "node B (10.213.0.12): 0 upstream blob requests, 0 bytes" in text
    assert "node C (10.213.0.13): 0 upstream blob requests, 0 bytes" in text
    assert "ok: 0 upstream blob requests from B and C" in text
    assert "ok: doctor exits 0: a peer has it" in text
    assert "mirror withdrawn (3 failures in a row)" in text
    assert "FAILED" not in text

"""The health gate: advertise Spegel in hosts.toml only while its /v2/ answers.

A dead mirror costs containerd one dial timeout per layer, and a hung one can eat the whole pull
timeout, so after `gate_failures` failed probes in a row the Spegel host tables are withdrawn, and
put back on the first success.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace

from spegel_node.record import GateState

PROBE_TIMEOUT_S = 1.0
USER_AGENT = "spegel-node"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str  # "HTTP 200", "connection refused", "timed out after 1.0s"


def probe_v2(mirror_url: str, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """GET <mirror>/v2/, all of it (connect to last byte) within `timeout`; only a 200 counts
    as healthy. `mirror_url` is the node's Spegel, `http://host:port`."""
    from spegel_node.httpprobe import http_request  # imported here: most commands never probe

    answer = http_request(
        mirror_url.rstrip("/") + "/v2/", timeout=timeout, max_body=65536, user_agent=USER_AGENT
    )
    if answer.status is not None:
        return ProbeResult(answer.status == 200, f"HTTP {answer.status}")
    if answer.timed_out:
        return ProbeResult(False, f"timed out after {timeout:g}s")
    if answer.error == "connection refused":
        return ProbeResult(False, answer.error)
    return ProbeResult(False, "connection failed")


def next_gate_state(
    previous: GateState, probe: ProbeResult, threshold: int, now: float | None = None
) -> GateState:
    """Pure: the gate after one probe. Withdraw after `threshold` failures in a row; restore on success."""
    now = time.time() if now is None else now
    if probe.ok:
        failures, withdrawn = 0, False
    else:
        failures = previous.consecutive_failures + 1
        withdrawn = previous.withdrawn or failures >= threshold
    changed = withdrawn != previous.withdrawn
    return replace(
        previous,
        consecutive_failures=failures,
        withdrawn=withdrawn,
        last_probe_ok=probe.ok,
        last_probe_at=now,
        last_change_at=now if changed else previous.last_change_at,
        last_error="" if probe.ok else probe.detail,
    )


def log_transition(before: GateState, after: GateState, mirror_url: str) -> None:
    """One line on stderr (journald keeps it) when the gate opens or closes."""
    if after.withdrawn and not before.withdrawn:
        print(
            f"spegel-node: gate: withdrawing mirror {mirror_url} after "
            f"{after.consecutive_failures} failed /v2/ probes ({after.last_error})",
            file=sys.stderr,
        )
    elif before.withdrawn and not after.withdrawn:
        print(
            f"spegel-node: gate: mirror {mirror_url} answers again; restoring it", file=sys.stderr
        )

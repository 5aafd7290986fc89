"""The health gate: advertise Spegel in hosts.toml only while its /v2/ answers.

A dead mirror costs containerd one dial timeout per layer, and a hung one can eat the whole pull
timeout, so after `gate_failures` failed probes in a row the Spegel host tables are withdrawn, and
put back on the first success.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace

from spegel_node.state import GateState

PROBE_TIMEOUT_S = 1.0
USER_AGENT = "spegel-node"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str  # "HTTP 200", "connection refused", "timed out after 1.0s"


def probe_v2(mirror_url: str, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """GET <mirror>/v2/ within `timeout` in total, from connect to the status line (a Spegel that
    answers one byte at a time cannot hold apply and its lock); only a 200 counts as healthy.
    `mirror_url` is the node's Spegel, `http://host:port`. One plain request on a socket: no
    redirects followed, no proxies, no retries."""
    import socket  # imported here: most commands never probe
    from urllib.parse import urlsplit

    parts = urlsplit(mirror_url)
    host, port = parts.hostname or "", parts.port or 80
    deadline = time.monotonic() + timeout
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = (
        f"GET /v2/ HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {USER_AGENT}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining

    try:
        with socket.create_connection((host, port), timeout=left()) as sock:
            sock.settimeout(left())
            sock.sendall(request)
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                sock.settimeout(left())
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        return ProbeResult(False, f"timed out after {timeout:g}s")
    except ConnectionRefusedError:
        return ProbeResult(False, "connection refused")
    except OSError:
        return ProbeResult(False, "connection failed")
    fields = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        return ProbeResult(False, "connection failed")
    status = int(fields[1])
    return ProbeResult(status == 200, f"HTTP {status}")


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

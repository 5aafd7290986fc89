from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from spegel_node.gate import ProbeResult, next_gate_state, probe_v2
from spegel_node.record import GateState

OK = ProbeResult(True, "HTTP 200")
DOWN = ProbeResult(False, "connection refused")


def test_withdraws_after_threshold_failures_in_a_row_and_restores_on_first_success() -> None:
    gate = GateState()
    for expected_withdrawn in (False, False, True, True):
        gate = next_gate_state(gate, DOWN, threshold=3, now=1.0)
        assert gate.withdrawn is expected_withdrawn
    assert gate.consecutive_failures == 4
    assert gate.last_error == "connection refused"
    gate = next_gate_state(gate, OK, threshold=3, now=2.0)
    assert not gate.withdrawn
    assert gate.consecutive_failures == 0
    assert gate.last_change_at == 2.0


def test_a_success_resets_the_count() -> None:
    gate = next_gate_state(GateState(), DOWN, 3)
    gate = next_gate_state(gate, DOWN, 3)
    gate = next_gate_state(gate, OK, 3)
    gate = next_gate_state(gate, DOWN, 3)
    assert gate.consecutive_failures == 1
    assert not gate.withdrawn


class _V2(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/v2/" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def v2_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _V2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_probe_against_real_listeners(v2_server: http.server.HTTPServer) -> None:
    url = f"http://127.0.0.1:{v2_server.server_address[1]}"
    assert probe_v2(url) == ProbeResult(True, "HTTP 200")
    _V2.status = 500
    try:
        assert probe_v2(url) == ProbeResult(False, "HTTP 500")
    finally:
        _V2.status = 200
    v2_server.shutdown()
    v2_server.server_close()
    assert probe_v2(url) == ProbeResult(False, "connection refused")

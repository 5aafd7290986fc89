"""httpprobe: one request under a total deadline, from connect to last byte."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from spegel_node.gate import ProbeResult, probe_v2
from spegel_node.httpprobe import http_request

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class Trickle:
    """Answers every connection with a valid 200, one byte every `gap` seconds (a slow loris)."""

    def __init__(self, gap: float, answer: bytes = ANSWER) -> None:
        self.gap, self.answer = gap, answer
        self.sent = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                for i in range(len(self.answer)):
                    if self._stop.wait(self.gap):
                        return
                    try:
                        conn.sendall(self.answer[i : i + 1])
                    except OSError:
                        break
                    self.sent += 1

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


@pytest.fixture
def trickle() -> Iterator[Trickle]:
    server = Trickle(gap=0.05)
    yield server
    server.close()


def test_a_peer_answering_byte_by_byte_is_cut_off_at_the_deadline(trickle: Trickle) -> None:
    # Each byte arrives well inside a per-read timeout of 0.3 s, so only a total deadline ends it:
    # the whole answer would take len(ANSWER) * 0.05 = about 2 s.
    started = time.monotonic()
    result = http_request(f"{trickle.url}/v2/", timeout=0.3)
    assert result.timed_out and result.error == "no answer within 0.3s"
    assert trickle.sent < len(ANSWER)  # it gave up mid-answer
    assert time.monotonic() - started < 1.5


def test_the_gate_probe_has_the_same_deadline(trickle: Trickle) -> None:
    assert probe_v2(trickle.url, timeout=0.3) == ProbeResult(False, "timed out after 0.3s")
    assert trickle.sent < len(ANSWER)


def test_a_slow_but_complete_answer_inside_the_deadline_counts() -> None:
    server = Trickle(gap=0.001)
    try:
        assert probe_v2(server.url, timeout=5) == ProbeResult(True, "HTTP 200")
    finally:
        server.close()


@pytest.mark.parametrize("url", ["https://127.0.0.1/", "http:///v2/", "http://127.0.0.1:99999/"])
def test_urls_it_does_not_probe(url: str) -> None:
    result = http_request(url, timeout=0.5)
    assert result.status is None and result.error.startswith("cannot probe")

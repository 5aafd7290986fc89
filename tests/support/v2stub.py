"""A stand-in for Spegel's `/v2/` on loopback: 200 on `/v2/`, 404 elsewhere (for the gate's
probe, doctor's spegel.v2 and `run`), served on a daemon thread."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator


class _V2(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/v2/" else 404)
        self.send_header("Content-Length", "2")
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def v2_server() -> Iterator[int]:
    """The port of a `/v2/` stand-in on 127.0.0.1, up while the context is open."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _V2)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()

"""A fake containerd socket for fake node trees: a unix socket that answers containerd's gRPC
`Version` and CRI `RuntimeService/Status` calls over cleartext HTTP/2 (served with `h2`), the way
the real one does (checked against containerd 1.6.20 in test_doctor_sandbox.py), or misbehaves on
purpose.

Modes: "answer" (default); "hang" (accepts connections, never sends a byte); "handshake" (speaks
HTTP/2, never answers a call); "close" (accepts, then closes the connection); "no_cri" (answers Version; Status gets containerd's trailers-only
UNIMPLEMENTED, as with the CRI plugin disabled); "cri_error" (Status: headers, then trailers
with INTERNAL and a percent-encoded message); "reset" (Status: RST_STREAM); "garbage" (sends
bytes that are not HTTP/2).

Builders in fake_nodes.py leave a regular file as the socket placeholder; entering the context
replaces it with the listening socket (the placeholder comes back on exit).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded

if TYPE_CHECKING:
    from typing import Self  # 3.11+: the doctor tests import this module on 3.9 too
from h2.exceptions import H2Error

from spegel_node.doctor.cri import grpc_frame

NO_CRI_MESSAGE = "unknown service runtime.v1.RuntimeService"  # containerd 1.6.20's words
GRPC = ("content-type", "application/grpc")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def cri_config(
    config_path: str = "/etc/containerd/certs.d",
    discard_unpacked_layers: bool = False,
    use_local_image_pull: bool | None = None,
) -> dict[str, Any]:
    """A CRI Status `config` like containerd's (2.x layout: image settings under `containerd`)."""
    containerd: dict[str, Any] = {
        "snapshotter": "overlayfs",
        "discardUnpackedLayers": discard_unpacked_layers,
    }
    if use_local_image_pull is not None:
        containerd["useLocalImagePull"] = use_local_image_pull
    return {
        "containerd": containerd,
        "registry": {"configPath": config_path, "mirrors": None},
        "containerdEndpoint": "/run/containerd/containerd.sock",
    }


class FakeContainerd:
    def __init__(
        self,
        path: Path,
        *,
        version: str = "2.0.4",
        config: dict[str, Any] | None = None,
        mode: str = "answer",
    ) -> None:
        self.path = path
        self.version = version
        self.config = cri_config() if config is None else config
        self.mode = mode
        self.calls: list[str] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._placeholder = False

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self._placeholder = True
            self.path.unlink()
        dir_fd = os.open(self.path.parent, os.O_PATH)
        try:
            self._listener.bind(f"/proc/self/fd/{dir_fd}/{self.path.name}")
        finally:
            os.close(dir_fd)
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for conn in [*self._conns, self._listener]:
            with contextlib.suppress(OSError):
                conn.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._placeholder:
            self.path.touch()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            if self.mode != "hang":
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    # -- one connection

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, H2Error, StopIteration):
            conn.settimeout(5)
            if self.mode == "garbage":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                return
            if self.mode == "close":
                conn.shutdown(socket.SHUT_RDWR)
                return
            h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
            h2.initiate_connection()
            conn.sendall(h2.data_to_send())
            paths: dict[int, str] = {}
            outbox: dict[int, bytearray] = {}  # replies waiting for flow-control window
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                for event in h2.receive_data(chunk):
                    if isinstance(event, RequestReceived):
                        paths[event.stream_id] = next(v for k, v in event.headers if k == ":path")
                    elif isinstance(event, DataReceived):
                        h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, StreamEnded) and event.stream_id in paths:
                        path = paths.pop(event.stream_id)
                        self.calls.append(path)
                        if self.mode != "handshake":
                            reply = self._respond(h2, event.stream_id, path)
                            if reply is not None:
                                outbox[event.stream_id] = bytearray(reply)
                _flush(h2, outbox)
                conn.sendall(h2.data_to_send())

    def _respond(self, h2: H2Connection, stream: int, path: str) -> bytes | None:
        """Answer a call: the reply's gRPC bytes (sent as the window allows), or None when done."""
        status = path.endswith("/Status")
        if path.endswith("/Version"):
            message = _field(1, self.version.encode()) + _field(2, b"fake-revision")
        elif status and self.mode == "reset":
            h2.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
            return None
        elif status and self.mode == "cri_error":
            h2.send_headers(stream, [(":status", "200"), GRPC])
            trailers = [("grpc-status", "13"), ("grpc-message", "boom: 100%25 broken")]
            h2.send_headers(stream, trailers, end_stream=True)
            return None
        elif status and self.mode != "no_cri":
            entry = _field(1, b"config") + _field(2, json.dumps(self.config).encode())
            message = _field(2, entry)
        else:  # trailers-only, like containerd for a service it does not serve
            error = [("grpc-status", "12"), ("grpc-message", NO_CRI_MESSAGE)]
            h2.send_headers(stream, [(":status", "200"), GRPC, *error], end_stream=True)
            return None
        h2.send_headers(stream, [(":status", "200"), GRPC])
        return grpc_frame(message)


def _flush(h2: H2Connection, outbox: dict[int, bytearray]) -> None:
    """Send what the client's flow-control windows allow; the trailers once a reply is sent."""
    for stream, pending in list(outbox.items()):
        while pending:
            room = min(h2.local_flow_control_window(stream), h2.max_outbound_frame_size)
            if room <= 0:
                break
            h2.send_data(stream, bytes(pending[:room]))
            del pending[:room]
        if not pending:
            del outbox[stream]
            h2.send_headers(stream, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True)

"""A fake containerd socket for fake node trees: a unix socket that answers containerd's gRPC
`Version` and CRI `RuntimeService/Status` calls over cleartext HTTP/2, the way the real one
does (checked against containerd 1.6.20 in test_doctor_sandbox.py), or misbehaves on purpose.

Modes: "answer" (default); "hang" (accepts connections, never sends a byte); "no_cri" (answers
Version, ends the Status call with a gRPC error and no message, as with the CRI plugin off);
"garbage" (sends bytes that are not HTTP/2).

Builders in fake_nodes.py leave a regular file as the socket placeholder; entering the context
replaces it with the listening socket (the placeholder comes back on exit).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Self

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


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


def _literal(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


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
        with contextlib.suppress(OSError):
            conn.settimeout(5)
            if self.mode == "garbage":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                return
            buf = self._read_exact(conn, len(PREFACE))
            if buf != PREFACE:
                return
            conn.sendall(_frame(0x4, 0, 0))  # server SETTINGS
            paths: dict[int, str] = {}
            while not self._stop.is_set():
                header = self._read_exact(conn, 9)
                if header is None:
                    return
                length = int.from_bytes(header[:3], "big")
                kind, flags = header[3], header[4]
                stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                payload = self._read_exact(conn, length) if length else b""
                if payload is None:
                    return
                if kind == 0x1:
                    paths[stream] = self._path_of(payload)
                elif kind == 0x0 and flags & 0x1 and stream in paths:
                    self.calls.append(paths[stream])
                    conn.sendall(self._respond(stream, paths[stream]))

    @staticmethod
    def _read_exact(conn: socket.socket, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    @staticmethod
    def _path_of(block: bytes) -> str:
        """`:path` from a header block of literals without indexing (what the client sends)."""
        i = 0
        while i < len(block) and block[i] == 0:
            name_len = block[i + 1]
            name = block[i + 2 : i + 2 + name_len].decode()
            value_len = block[i + 2 + name_len]
            start = i + 3 + name_len
            value = block[start : start + value_len].decode()
            if name == ":path":
                return value
            i = start + value_len
        return ""

    def _respond(self, stream: int, path: str) -> bytes:
        head = _frame(0x1, 0x4, stream, _literal(":status", "200"))
        if path.endswith("/Version"):
            message = _field(1, self.version.encode()) + _field(2, b"fake-revision")
        elif path.endswith("/Status") and self.mode != "no_cri":
            entry = _field(1, b"config") + _field(2, json.dumps(self.config).encode())
            message = _field(2, entry)
        else:
            trailers = _literal("grpc-status", "12") + _literal("grpc-message", "unimplemented")
            return _frame(0x1, 0x5, stream, _literal(":status", "200") + trailers)
        body = b"\x00" + struct.pack(">I", len(message)) + message
        trailers = _frame(0x1, 0x5, stream, _literal("grpc-status", "0"))
        return head + _frame(0x0, 0, stream, body) + trailers

"""Ask the running containerd over its socket: its version, and the live CRI config.

A minimal gRPC client over cleartext HTTP/2, enough for two unary calls with tiny requests:
containerd's `Version` service and CRI `RuntimeService/Status` with `verbose` (the call behind
`crictl info`; its `info["config"]` is the CRI config containerd actually runs with). Request
headers are sent as HPACK literals (no Huffman, no dynamic table) and the server's header blocks
are skipped, so no HPACK decoder is needed. Works wherever the socket is reachable, also from a
pod with the host at /host. Never raises: the answer says what happened.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

VERSION_PATH = "/containerd.services.version.v1.Version/Version"
STATUS_PATH = "/runtime.v1.RuntimeService/Status"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
WINDOW = 1 << 20
MAX_ANSWER = 8 << 20
_DATA, _HEADERS, _RST, _SETTINGS, _PING, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
_END_STREAM, _ACK, _PADDED = 0x1, 0x1, 0x8
_VERSION_STREAM, _STATUS_STREAM = 1, 3
_SUN_PATH_MAX = 100  # sun_path holds 108 bytes; longer paths go through /proc/self/fd


@dataclass(frozen=True)
class SocketAnswer:
    # "ok" (answered), "missing", "not_socket", "refused", "denied", "timeout" (connect),
    # "no_answer" (accepted, then silent), "error"
    state: str
    detail: str
    version: str | None = None
    revision: str | None = None
    info: dict[str, str] = field(default_factory=dict)  # CRI Status info (verbose)
    status_error: str = ""  # why `info` is empty while the version answered
    elapsed_s: float = 0.0


def query(path: Path, timeout: float) -> SocketAnswer:
    """Version and CRI status of the containerd listening on the unix socket at `path`."""
    started = time.monotonic()
    result = _query(path, timeout, started + timeout)
    return replace(result, elapsed_s=time.monotonic() - started)


def _query(path: Path, timeout: float, deadline: float) -> SocketAnswer:
    answer = SocketAnswer
    try:
        st = path.lstat()
    except FileNotFoundError:
        return answer("missing", "does not exist")
    except OSError as e:
        return answer("error", f"cannot be read: {e.strerror}")
    if stat.S_ISLNK(st.st_mode):
        try:
            st = path.stat()
        except OSError:
            return answer("missing", "is a dangling symlink")
    if not stat.S_ISSOCK(st.st_mode):
        return answer("not_socket", "exists but is not a socket")
    try:
        with _connected(path, timeout) as sock:
            return _exchange(sock, deadline, timeout)
    except ConnectionRefusedError:
        return answer("refused", "refuses connections (a stale socket: containerd is not running)")
    except FileNotFoundError:
        return answer("missing", "does not exist")
    except PermissionError:
        return answer("denied", "permission denied (run doctor as root)")
    except TimeoutError:
        return answer("timeout", f"did not accept a connection within {timeout:g}s")
    except OSError as e:
        return answer("error", e.strerror or type(e).__name__)


@contextlib.contextmanager
def _connected(path: Path, timeout: float) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if len(os.fsencode(path)) < _SUN_PATH_MAX:
            sock.connect(str(path))
        else:
            dir_fd = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
            try:
                sock.connect(f"/proc/self/fd/{dir_fd}/{path.name}")
            finally:
                os.close(dir_fd)
        yield sock
    finally:
        sock.close()


# ---------------------------------------------------------------- HTTP/2 + gRPC


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: str, value: str) -> bytes:
    """An HPACK "literal header field without indexing, new name", no Huffman (lengths < 127)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def _call(stream: int, path: str, message: bytes) -> bytes:
    headers = b"".join(
        _literal(k, v)
        for k, v in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "containerd"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return _frame(_HEADERS, 0x4, stream, headers) + _frame(_DATA, _END_STREAM, stream, body)


def request_bytes() -> bytes:
    """What the client sends: preface, settings, window, the Version and Status calls."""
    settings = struct.pack(">HI", 0x4, WINDOW)  # SETTINGS_INITIAL_WINDOW_SIZE
    return (
        PREFACE
        + _frame(_SETTINGS, 0, 0, settings)
        + _frame(0x8, 0, 0, struct.pack(">I", WINDOW - 65535))  # WINDOW_UPDATE, connection
        + _call(_VERSION_STREAM, VERSION_PATH, b"")
        + _call(_STATUS_STREAM, STATUS_PATH, b"\x08\x01")  # StatusRequest{verbose: true}
    )


def _exchange(sock: socket.socket, deadline: float, timeout: float) -> SocketAnswer:
    sock.sendall(request_bytes())
    data: dict[int, bytearray] = {_VERSION_STREAM: bytearray(), _STATUS_STREAM: bytearray()}
    ended: set[int] = set()
    buf = bytearray()
    heard = False
    goaway = False
    while len(ended) < 2 and not goaway:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        buf += chunk
        if not heard and len(buf) >= 9 and (buf[3] != _SETTINGS or int.from_bytes(buf[5:9], "big")):
            return SocketAnswer(
                "error", "answers, but not with HTTP/2: is this containerd's socket?"
            )
        heard = heard or len(buf) >= 9
        if len(buf) > MAX_ANSWER:
            break
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            kind, flags = buf[3], buf[4]
            stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(buf[9 : 9 + length])
            del buf[: 9 + length]
            if kind == _SETTINGS and not flags & _ACK:
                sock.sendall(_frame(_SETTINGS, _ACK, 0))
            elif kind == _PING and not flags & _ACK:
                sock.sendall(_frame(_PING, _ACK, 0, payload))
            elif kind == _GOAWAY:
                goaway = True
            elif kind == _DATA and stream in data:
                if flags & _PADDED and payload:
                    payload = payload[1 : len(payload) - payload[0]]
                data[stream] += payload
            if stream in data and (
                kind == _RST or (kind in (_DATA, _HEADERS) and flags & _END_STREAM)
            ):
                ended.add(stream)
    if not heard:
        return SocketAnswer(
            "no_answer", f"accepts connections but did not answer within {timeout:g}s"
        )
    version = _message(bytes(data[_VERSION_STREAM]))
    status = _message(bytes(data[_STATUS_STREAM]))
    if version is None and status is None:
        if len(ended) < 2 and not goaway:
            return SocketAnswer(
                "no_answer", f"answered the handshake but not the calls within {timeout:g}s"
            )
        return SocketAnswer("error", "answered, but not as containerd (no gRPC Version answer)")
    fields = dict(_strings(version)) if version is not None else {}
    info: dict[str, str] = {}
    status_error = ""
    if status is None:
        status_error = "the CRI Status call returned nothing (CRI plugin disabled?)"
    else:
        for number, entry in _fields(status):
            if number == 2 and isinstance(entry, bytes):
                kv = dict(_strings(entry))
                info[kv.get(1, "")] = kv.get(2, "")
    return SocketAnswer(
        "ok",
        "answers",
        version=fields.get(1),
        revision=fields.get(2),
        info=info,
        status_error=status_error,
    )


def _message(body: bytes) -> bytes | None:
    """The one uncompressed gRPC message in a stream's DATA, None if there is none."""
    if len(body) < 5 or body[0] != 0:
        return None
    length = int.from_bytes(body[1:5], "big")
    return body[5 : 5 + length] if len(body) >= 5 + length else None


# ---------------------------------------------------------------- protobuf, just enough


def _varint(b: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(b) or shift > 63:
            raise ValueError("truncated varint")
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return result, i


def _fields(b: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Top-level (field number, value) pairs; varints as int, length-delimited as bytes."""
    i = 0
    try:
        while i < len(b):
            key, i = _varint(b, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _varint(b, i)
                yield number, value
            elif wire == 2:
                n, i = _varint(b, i)
                yield number, b[i : i + n]
                i += n
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                return
    except ValueError:
        return


def _strings(b: bytes) -> Iterator[tuple[int, str]]:
    for number, value in _fields(b):
        if isinstance(value, bytes):
            yield number, value.decode("utf-8", "replace")

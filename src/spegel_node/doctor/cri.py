"""Ask the running containerd over its socket: its version, and the live CRI config.

Two unary gRPC calls over cleartext HTTP/2 on the unix socket: containerd's `Version` service and
CRI `RuntimeService/Status` with `verbose` (the call behind `crictl info`; its `info["config"]` is
the CRI config containerd actually runs with). HTTP/2 itself (framing, settings, HPACK, flow
control) is the `h2` library's, imported only when a socket is asked; each call's outcome is its
gRPC status (`grpc-status`/`grpc-message` in the trailers, or in the headers of a trailers-only
answer), so e.g. CRI answering UNIMPLEMENTED is reported as such. The two replies are read with
just enough protobuf (no generated code). Works wherever the socket is reachable, also from a pod
with the host at /host. Never raises: the answer says what happened.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from spegel_node.compat import TIMEOUT_ERRORS

if TYPE_CHECKING:
    from h2.connection import H2Connection

VERSION_PATH = "/containerd.services.version.v1.Version/Version"
STATUS_PATH = "/runtime.v1.RuntimeService/Status"
STATUS_VERBOSE = b"\x08\x01"  # StatusRequest{verbose: true}
MAX_ANSWER = 8 << 20
# fmt: off
GRPC_CODES = (  # gRPC status codes, by number
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)
# fmt: on
UNIMPLEMENTED = 12
_SETTINGS = 0x4
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
    not_asked = _not_a_socket(path)
    if not_asked is not None:
        return replace(not_asked, elapsed_s=time.monotonic() - started)
    conn = _h2_connection()
    started = time.monotonic()  # the socket's time, not h2's import
    result = _ask(path, conn, timeout, started + timeout)
    return replace(result, elapsed_s=time.monotonic() - started)


def _not_a_socket(path: Path) -> SocketAnswer | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return SocketAnswer("missing", "does not exist")
    except OSError as e:
        return SocketAnswer("error", f"cannot be read: {e.strerror}")
    if stat.S_ISLNK(st.st_mode):
        try:
            st = path.stat()
        except OSError:
            return SocketAnswer("missing", "is a dangling symlink")
    if not stat.S_ISSOCK(st.st_mode):
        return SocketAnswer("not_socket", "exists but is not a socket")
    return None


def _ask(path: Path, conn: H2Connection, timeout: float, deadline: float) -> SocketAnswer:
    answer = SocketAnswer
    try:
        with _connected(path, timeout) as sock:
            return _exchange(sock, conn, deadline, timeout)
    except ConnectionRefusedError:
        return answer("refused", "refuses connections (a stale socket: containerd is not running)")
    except FileNotFoundError:
        return answer("missing", "does not exist")
    except PermissionError:
        return answer("denied", "permission denied (run doctor as root)")
    except TIMEOUT_ERRORS:
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


# ---------------------------------------------------------------- gRPC over h2


def _h2_connection() -> H2Connection:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    return H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class _Call:
    """One unary call and its answer as it arrives."""

    path: str
    http_status: str = ""
    grpc_status: int | None = None
    grpc_message: str = ""
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: str = ""  # the RST_STREAM error code's name
    cut: str = ""  # why the connection ended before the call did

    def take(self, headers: Iterable[tuple[bytes | str, bytes | str]]) -> None:
        for raw_name, raw_value in headers:
            name, value = _text(raw_name), _text(raw_value)
            if name == ":status":
                self.http_status = value
            elif name == "grpc-status":
                self.grpc_status = int(value) if value.isdigit() else 2  # UNKNOWN
            elif name == "grpc-message":
                self.grpc_message = unquote(value)  # percent-encoded on the wire

    @property
    def reply(self) -> bytes | None:
        """The reply message; None unless the call ended with gRPC status OK."""
        if not self.ended or self.http_status != "200" or self.grpc_status != 0:
            return None
        return _message(bytes(self.data))

    def failure(self, timeout: float) -> str:
        """Why there is no reply, to follow "the <call> call"."""
        if self.reset:
            return f"was reset ({self.reset})"
        if not self.ended:
            return self.cut or f"did not answer within {timeout:g}s"
        if self.http_status != "200":
            return f"answered HTTP {self.http_status or 'without a status'}, not gRPC"
        if self.grpc_status is None:
            return "ended without a gRPC status"
        if self.grpc_status != 0:
            code = self.grpc_status
            name = GRPC_CODES[code] if code < len(GRPC_CODES) else f"gRPC status {code}"
            return f"answered {name}" + (f" ({self.grpc_message})" if self.grpc_message else "")
        return "answered OK without a message"


def _name(code: object) -> str:
    """An HTTP/2 error code's name (h2 gives known codes as an IntEnum)."""
    return str(getattr(code, "name", f"error code {code}"))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _send(sock: socket.socket, conn: H2Connection) -> None:
    pending = conn.data_to_send()
    if pending:
        sock.sendall(pending)


def _exchange(
    sock: socket.socket, conn: H2Connection, deadline: float, timeout: float
) -> SocketAnswer:
    from h2.events import (
        ConnectionTerminated,
        DataReceived,
        ResponseReceived,
        StreamEnded,
        StreamReset,
        TrailersReceived,
    )
    from h2.exceptions import H2Error

    conn.initiate_connection()
    version_call, status_call = _Call(VERSION_PATH), _Call(STATUS_PATH)
    calls: dict[int, _Call] = {}
    for call, message in ((version_call, b""), (status_call, STATUS_VERBOSE)):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", call.path),
                (":authority", "containerd"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        conn.send_data(stream, grpc_frame(message), end_stream=True)
        calls[stream] = call
    head = b""  # the first 9 bytes: the server's preface must start with a SETTINGS frame
    received = 0
    cut = ""
    try:
        _send(sock, conn)
        while not cut and not all(call.ended for call in calls.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                cut = "was cut: containerd closed the connection"
                break
            if len(head) < 9:
                head += chunk[: 9 - len(head)]
                if len(head) == 9 and (head[3] != _SETTINGS or any(head[5:9])):
                    return SocketAnswer(
                        "error", "answers, but not with HTTP/2: is this containerd's socket?"
                    )
            received += len(chunk)
            if received > MAX_ANSWER:
                return SocketAnswer("error", f"answered more than {MAX_ANSWER >> 20} MiB")
            for event in conn.receive_data(chunk):
                if isinstance(event, ConnectionTerminated):
                    cut = f"was cut: containerd ended the connection (GOAWAY {_name(event.error_code)})"
                    continue
                answering = calls.get(getattr(event, "stream_id", 0) or 0)
                if answering is None:
                    continue
                if isinstance(event, (ResponseReceived, TrailersReceived)):
                    answering.take(event.headers)
                elif isinstance(event, DataReceived):
                    answering.data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, StreamEnded):
                    answering.ended = True
                elif isinstance(event, StreamReset):
                    answering.ended, answering.reset = True, _name(event.error_code)
            _send(sock, conn)
    except TIMEOUT_ERRORS:
        pass  # the deadline: judged below from what did arrive
    except H2Error as e:
        return SocketAnswer("error", f"broke the HTTP/2 protocol: {e}")
    except (ConnectionResetError, BrokenPipeError):
        cut = "was cut: containerd closed the connection"
    for call in calls.values():
        call.cut = cut
    return _answer(version_call, status_call, heard=bool(head), cut=cut, timeout=timeout)


def _answer(
    version_call: _Call, status_call: _Call, *, heard: bool, cut: str, timeout: float
) -> SocketAnswer:
    if not heard:
        if cut:
            return SocketAnswer("error", "accepts connections but closes them without answering")
        return SocketAnswer(
            "no_answer", f"accepts connections but did not answer within {timeout:g}s"
        )
    version, status = version_call.reply, status_call.reply
    if version is None and status is None:
        if not cut and not version_call.ended and not status_call.ended:
            return SocketAnswer(
                "no_answer", f"answered the handshake but not the calls within {timeout:g}s"
            )
        return SocketAnswer(
            "error",
            "answered, but not as containerd: the Version call "
            f"{version_call.failure(timeout)}, the CRI Status call {status_call.failure(timeout)}",
        )
    fields = dict(_strings(version)) if version is not None else {}
    info: dict[str, str] = {}
    status_error = ""
    if status is None:
        status_error = f"the CRI Status call {status_call.failure(timeout)}"
        if status_call.grpc_status == UNIMPLEMENTED:
            status_error += ": the CRI plugin is not loaded"
    else:
        for number, entry in _fields(status):
            if number == 2 and isinstance(entry, bytes):  # map<string, string> info = 2
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
    """The one uncompressed gRPC message in a call's DATA, None if there is none."""
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
                if i + n > len(b):
                    return
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

"""The one HTTP client: a single plain-HTTP request under a total deadline.

The deadline runs from the connect to the last byte read. A per-read timeout is not enough: a
peer that answers one byte a second never trips one, and the health gate runs while apply holds
the node's lock. Standard library only; no redirects followed, no proxies from the environment,
no retries, the body read up to a cap. A failed probe is a result, never an exception.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from spegel_node.compat import TIMEOUT_ERRORS

MAX_BODY = 4 << 20


@dataclass(frozen=True)
class HttpResult:
    url: str
    status: int | None  # None: no HTTP answer (see `error`)
    error: str = ""  # "connection refused", "no answer within 1.5s", ...
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    elapsed_s: float = 0.0

    @property
    def answered(self) -> bool:
        return self.status is not None

    @property
    def timed_out(self) -> bool:
        return self.error.startswith("no answer")

    def describe(self) -> str:
        """`HTTP 200 in 3 ms`, `connection refused`, `no answer within 1.5s`."""
        if self.status is None:
            return self.error
        return f"HTTP {self.status} in {self.elapsed_s * 1000:.0f} ms"


class _DeadlineSocket(socket.socket):
    """A socket whose every read and write may take only what is left of one deadline."""

    deadline = 0.0

    def _left(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.settimeout(left)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._left()
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._left()
        return super().recv(bufsize, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._left()
        super().sendall(data, flags)


class _Connection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, deadline: float) -> None:
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.001))
        self._deadline = deadline

    def connect(self) -> None:
        error: OSError = OSError("no address")
        for family, kind, proto, _, address in socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        ):
            sock = _DeadlineSocket(family, kind, proto)
            sock.deadline = self._deadline
            try:
                sock._left()
                sock.connect(address)
            except OSError as e:
                sock.close()
                error = e
                continue
            self.sock = sock
            return
        raise error


def http_request(
    url: str,
    *,
    method: str = "GET",
    timeout: float,
    headers: Mapping[str, str] | None = None,
    max_body: int = MAX_BODY,
    user_agent: str = "spegel-node",
) -> HttpResult:
    """One plain-HTTP request to `url` (http://host:port/path?query), all of it within `timeout`."""
    parts = urlsplit(url)
    started = time.monotonic()

    def done(
        status: int | None,
        error: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> HttpResult:
        return HttpResult(url, status, error, dict(headers or {}), body, time.monotonic() - started)

    try:
        port = parts.port or 80
    except ValueError:
        port = 0
    if parts.scheme != "http" or not parts.hostname or not port:
        return done(None, f"cannot probe {url}: only http://host[:port] URLs are probed")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    conn = _Connection(parts.hostname, port, started + timeout)
    try:
        conn.request(method, target, headers={"User-Agent": user_agent, **(headers or {})})
        response = conn.getresponse()
        body = b"" if method == "HEAD" else response.read(max_body)
        names = {k.lower(): v for k, v in response.getheaders()}
        return done(response.status, headers=names, body=body)
    except ConnectionRefusedError:
        return done(None, "connection refused")
    except TIMEOUT_ERRORS:
        return done(None, f"no answer within {timeout:g}s")
    except http.client.HTTPException as e:
        return done(None, f"not an HTTP answer ({type(e).__name__})")
    except OSError as e:
        return done(None, e.strerror or type(e).__name__)
    finally:
        conn.close()

"""Bounded network and process probes: one HTTP request, one program run, each with a timeout.

HTTP uses the standard library's http.client: one request, no redirects followed, no proxies,
no retries, the body read up to a cap. Nothing here raises for a failed probe: the result says
what happened, in words an operator can act on.
"""

from __future__ import annotations

import http.client
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_BODY = 4 << 20
USER_AGENT = "spegel-node-doctor"


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


def http_request(
    url: str,
    *,
    method: str = "GET",
    timeout: float,
    headers: Mapping[str, str] | None = None,
    max_body: int = MAX_BODY,
) -> HttpResult:
    """One plain-HTTP request to `url` (http://host:port/path?query)."""
    parts = urlsplit(url)
    started = time.monotonic()

    def done(
        status: int | None,
        error: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> HttpResult:
        return HttpResult(url, status, error, dict(headers or {}), body, time.monotonic() - started)

    if parts.scheme != "http" or not parts.hostname:
        return done(None, f"cannot probe {url}: only http:// URLs are probed")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request(method, target, headers={"User-Agent": USER_AGENT, **(headers or {})})
        response = conn.getresponse()
        body = b"" if method == "HEAD" else _read_capped(response, max_body, started + timeout)
        names = {k.lower(): v for k, v in response.getheaders()}
        return done(response.status, headers=names, body=body)
    except ConnectionRefusedError:
        return done(None, "connection refused")
    except TimeoutError:
        return done(None, f"no answer within {timeout:g}s")
    except http.client.HTTPException as e:
        return done(None, f"not an HTTP answer ({type(e).__name__})")
    except OSError as e:
        return done(None, e.strerror or type(e).__name__)
    finally:
        conn.close()


def _read_capped(response: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        if time.monotonic() > deadline:
            raise TimeoutError
        chunk = response.read(min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class RunResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: did not run or did not finish
    stdout: str = ""
    error: str = ""


def run_program(argv: Sequence[str], timeout: float) -> RunResult:
    """Run a program with no stdin, capture its output; killed after `timeout` seconds."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return RunResult(tuple(argv), None, error=f"did not finish within {timeout:g}s")
    except OSError as e:
        return RunResult(tuple(argv), None, error=e.strerror or type(e).__name__)
    return RunResult(tuple(argv), done.returncode, done.stdout, done.stderr.strip()[-300:])

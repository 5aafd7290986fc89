"""Bounded network and process probes: one HTTP request (httpprobe, under a total deadline)
and one program run, each with a timeout. Nothing here raises for a failed probe: the result
says what happened, in words an operator can act on.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from spegel_node import httpprobe
from spegel_node.httpprobe import MAX_BODY, HttpResult

__all__ = ["HttpResult", "RunResult", "http_request", "run_program"]
USER_AGENT = "spegel-node-doctor"


def http_request(
    url: str,
    *,
    method: str = "GET",
    timeout: float,
    headers: Mapping[str, str] | None = None,
    max_body: int = MAX_BODY,
) -> HttpResult:
    """One plain-HTTP request to `url` under a total deadline (httpprobe), as doctor."""
    return httpprobe.http_request(
        url,
        method=method,
        timeout=timeout,
        headers=headers,
        max_body=max_body,
        user_agent=USER_AGENT,
    )


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

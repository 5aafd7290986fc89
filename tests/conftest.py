"""Shared fixtures. The sandbox runs real containerd and docker-registry processes on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from support.sandbox import HangingServer, Sandbox, missing_binaries


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A fresh sandbox node (containerd, upstream, Spegel stand-in, pushed image); ~0.3 s."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"sandbox needs {', '.join(missing)} (make installs them)")
    if os.geteuid() != 0:
        pytest.skip("sandbox needs root (containerd)")
    with Sandbox() as node:
        yield node


@pytest.fixture
def hanging_server() -> Iterator[HangingServer]:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers."""
    with HangingServer() as server:
        yield server

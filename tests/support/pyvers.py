"""The unit tests on the oldest and newest Python Debian packages: bullseye (3.9), trixie (3.13).

``ensure_tree(suite)`` debootstraps a minbase tree with ``python3`` and ``python3-venv`` into
the test cache (``/var/cache/spegel-node-tests/pyvers-<suite>-<hash>``, the same cache as the
nspawn base image), built beside its final place and renamed when complete, under a lock.
``ensure_venv(tree, requirements)`` makes a venv in it with the runtime and test dependencies
from PyPI, cached by a hash of the requirement list. ``run_in_tree()`` runs a command in the
tree (``chroot`` in new mount and PID namespaces, with ``/dev`` and ``/proc``, the host's
network, resolver and CA bundle, so pip reaches PyPI as the host's pip does).

No systemd boots: the unit tests need only an interpreter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from support.nspawn import (
    CACHE_DIR,
    NspawnError,
    _flock,
    _tail,
    cached_tree,
    debootstrap_minbase,
)

# suite -> the python3 minor version its python3 package has
SUITES = {"bullseye": "3.9", "trixie": "3.13"}
PACKAGES = (
    "python3",
    "python3-venv",
    "e2fsprogs",
)  # e2fsprogs: chattr, for test_reliability_faults
_RECIPE_VERSION = 1
HOST_CA = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
TREE_CA = "/etc/spegel-node-test-host-ca.crt"
VENV = "/opt/venv"
TREE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable_reason() -> str | None:
    """Why the trees cannot be built or entered here, or None if they can."""
    if os.geteuid() != 0:
        return "debootstrap and chroot need root"
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make installs debootstrap)"
    return None


def tree_path(suite: str) -> Path:
    recipe = {"suite": suite, "include": sorted(PACKAGES), "version": _RECIPE_VERSION}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return CACHE_DIR / f"pyvers-{suite}-{digest}"


def ensure_tree(suite: str, *, timeout: float = 900.0) -> Path:
    """The cached minbase tree of ``suite`` with python3, debootstrapped first if missing."""
    tree = tree_path(suite)

    def build(tmp: Path) -> None:
        started, log = time.monotonic(), CACHE_DIR / f"{tree.name}.log"
        debootstrap_minbase(suite, PACKAGES, tmp, log, timeout)
        for deb in (tmp / "var" / "cache" / "apt" / "archives").glob("*.deb"):
            deb.unlink()
        with open(log, "a") as out:
            out.write(f"built in {time.monotonic() - started:.1f}s\n")

    return cached_tree(tree, f"pyvers-{suite}", build)


def run_in_tree(
    tree: Path,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` chrooted into ``tree`` (own mount and PID namespaces, host network)."""
    shutil.copy2("/etc/resolv.conf", tree / "etc" / "resolv.conf")
    if HOST_CA.is_file():
        shutil.copy2(HOST_CA, tree / TREE_CA.lstrip("/"))
    full_env = {"PATH": TREE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "PIP_CERT": TREE_CA,
                "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "180",
                "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}  # fmt: skip
    script = (
        'T="$1"; shift; mount --bind "$T" "$T" && mount --make-private "$T" && '
        'mount --rbind /dev "$T/dev" && mount --make-rslave "$T/dev" && '
        'mount -t proc proc "$T/proc" && exec chroot "$T" /usr/bin/env -i "$@"'
    )
    cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--", "sh", "-c", script,
           "sh", str(tree), *(f"{k}={v}" for k, v in full_env.items()), *argv]  # fmt: skip
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise NspawnError(
            f"{tree.name}: {' '.join(argv)!r} exited {proc.returncode}\n"
            f"stdout:\n{_tail(proc.stdout)}\nstderr:\n{_tail(proc.stderr)}"
        )
    return proc


def ensure_venv(tree: Path, requirements: Sequence[str], *, timeout: float = 900.0) -> str:
    """A venv in ``tree`` with ``requirements`` from PyPI; rebuilt when the list changes."""
    key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
    marker = tree / VENV.lstrip("/") / f".spegel-node-requirements-{key}"
    if marker.is_file():
        return VENV
    with _flock(CACHE_DIR / f".{tree.name}.venv.lock"):
        if marker.is_file():
            return VENV
        shutil.rmtree(tree / VENV.lstrip("/"), ignore_errors=True)
        run_in_tree(tree, ["python3", "-m", "venv", VENV], timeout=timeout)
        run_in_tree(tree, [f"{VENV}/bin/pip", "install", "-q", "-U", "pip"], timeout=timeout)
        run_in_tree(tree, [f"{VENV}/bin/pip", "install", "-q", *requirements], timeout=timeout)
        marker.write_text("\n".join(sorted(requirements)) + "\n")
    return VENV


def build_own_wheel(repo: Path, dest: Path, *, timeout: float = 300.0) -> Path:
    """``pip wheel --no-deps`` of the project (pure Python): the path of the one wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(dest),
         str(repo)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise NspawnError(f"pip wheel {repo} failed:\n{_tail(proc.stderr)}")
    (wheel,) = dest.glob("spegel_node-*.whl")
    return wheel


def tree_lock(tree: Path) -> contextlib.AbstractContextManager[None]:
    """The lock one test run holds on ``tree`` while it installs the wheel and runs tests."""
    return _flock(CACHE_DIR / f".{tree.name}.run.lock")

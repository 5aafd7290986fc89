"""Real Debian nodes, systemd as PID 1, booted under systemd-nspawn.

For tests of the systemd units (timer, path unit) and the Ansible role. PID 1 on the test
machine is not systemd, so the nodes are started the way REFERENCE.md section 5 describes:

* ``ensure_base_image()`` debootstraps one Debian bookworm tree (minbase + systemd, dbus,
  python3, containerd, docker-registry, ...) into a cache that survives across runs on the same
  machine (``/var/cache/spegel-node-tests``, or ``$SPEGEL_NODE_TEST_CACHE``). It is built in a
  temp dir beside its final place and renamed when complete, under a lock, so a killed build
  never leaves a half image and concurrent test processes build it once. The directory name
  carries a hash of the recipe: changing the package list builds a new image.

  Services in the base image: ``containerd.service`` stays enabled (it starts at boot, as on a
  real Kubernetes node; ``ctr`` reaches it at ``/run/containerd/containerd.sock``).
  ``docker-registry.service`` is disabled: a node is not a registry, and tests that want one (a
  stand-in for the Spegel mirror) start it with their own config and port.

* ``NspawnNode(name, base)`` is a context manager: it copies the base (``cp -a``), sets the
  hostname and a fresh machine-id, puts the launcher in its own cgroup, execs ``systemd-nspawn
  --boot`` with exactly REFERENCE's flags and waits (bounded poll) until ``systemctl
  is-system-running`` says ``running`` or ``degraded`` (degraded: a warning naming the failed
  units, also in ``node.failed_units``). ``boot_nodes(base, *names)`` boots several at once.
  Everything is undone on exit, also when the boot fails and at interpreter exit for nodes a
  test forgot: nspawn stopped (TERM = orderly halt, then TERM again = immediate, then KILL),
  cgroup dirs removed (deepest first), node tree removed.

* Node trees live on a tmpfs mounted per session at ``<cache>/nodes/<group>/``: copying the
  base there takes about 0.5 s, onto this machine's disk 3-9 s. Each running node costs about
  300 MB of RAM (plus what tests write into it); ``SPEGEL_NODE_TEST_TMPFS=0`` uses the disk.

* Each test process uses its own cgroup group ``spegel-node-test-<pid>-<starttime>``; groups
  (and node trees) whose owning process is gone, i.e. a crashed earlier run, are torn down
  before the first node of a session starts. The machine name (``-M``) is the node name, so
  two sessions booting ``node1`` at once share nspawn's ``/run/systemd/nspawn/propagate/node1``
  (only ``machinectl bind``/``copy-to`` use it; nothing here does).

* Commands run with ``node.run()`` enter the node's namespaces but stay in the test's own
  cgroup (not the node's); they still die with the node, being in its PID namespace.

* Path units: a change that lands while the triggered service still runs merges into that run
  (systemd queues no second start). Tests that change a watched file twice must wait until the
  service is done (``systemctl show -p SubState``: path ``waiting``, service ``dead``).

Networking: nodes have ``--private-network`` (only ``lo``). Commands that need the network, such
as ``apt-get``, must run in the node's mount/UTS/IPC/PID namespaces but the *host's* network
namespace: ``nsenter -t LEADER -m -u -i -p`` (no ``-n``). That is ``node.run(...,
host_network=True)``; ``node.apt_install(...)`` uses it. Python code is installed without any
network from a wheelhouse: ``build_wheelhouse(repo, dest)`` on the host, then
``node.install_wheelhouse(dest)``. The host and the nodes are both Debian 12 with CPython 3.11,
so wheels built on the host install in the node.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import psutil

T = TypeVar("T")

SUITE = "bookworm"
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "containerd",
    "docker-registry",
    "ca-certificates",
    "iproute2",
    "procps",
)
# Units disabled in the base image (see the module docstring).
BASE_DISABLED_UNITS = ("docker-registry.service",)
# Docs, man pages and translations are dropped from the base and kept out of later installs in
# the nodes (as slim container images do): about 60 MB less to copy per node.
DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""
# Bump when the post-debootstrap steps change, so the cache key changes with them.
_RECIPE_VERSION = 2

CACHE_DIR = Path(os.environ.get("SPEGEL_NODE_TEST_CACHE", "/var/cache/spegel-node-tests"))
GROUP_PREFIX = "spegel-node-test-"
WHEELHOUSES_KEPT = 4
NODES_ON_TMPFS = os.environ.get("SPEGEL_NODE_TEST_TMPFS", "1") != "0"
CGROUP_V1_SYSTEMD = Path("/sys/fs/cgroup/systemd")
CGROUP_UNIFIED = Path("/sys/fs/cgroup/unified")
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NSPAWN_FLAGS = (
    "--boot",
    "--register=no",
    "--keep-unit",
    "--console=passive",
    "--private-network",
    "--system-call-filter=@keyring bpf",
)
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class NspawnError(RuntimeError):
    """The nspawn harness could not do what was asked (build, boot, stop)."""


class NodeCommandError(subprocess.CalledProcessError):
    """A command inside a node exited non-zero; the message carries its output."""

    def __init__(self, node: str, proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(proc.returncode, proc.args, proc.stdout, proc.stderr)
        self.node = node

    def __str__(self) -> str:
        argv = self.cmd[self.cmd.index("--") + 1 :] if "--" in self.cmd else self.cmd
        parts = [f"{self.node}: {' '.join(map(str, argv))!r} exited {self.returncode}"]
        if self.stdout:
            parts.append(f"stdout:\n{_tail(self.stdout)}")
        if self.stderr:
            parts.append(f"stderr:\n{_tail(self.stderr)}")
        return "\n".join(parts)


def unavailable_reason() -> str | None:
    """Why nspawn nodes cannot run on this machine, or None if they can."""
    if os.geteuid() != 0:
        return "systemd-nspawn nodes need root"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "systemd-machine-id-setup"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make installs systemd-container and debootstrap)"
    if not _cgroup_roots():
        return "no cgroup hierarchy found under /sys/fs/cgroup"
    return None


# --------------------------------------------------------------------------------------------
# apt mirror


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian mirror URL this machine's apt sources use for ``suite``.

    Reads deb822 ``/etc/apt/sources.list.d/*.sources`` and one-line ``/etc/apt/sources.list``
    (and ``*.list``). ``$SPEGEL_NODE_TEST_MIRROR`` overrides.
    """
    override = os.environ.get("SPEGEL_NODE_TEST_MIRROR")
    if override:
        return override
    candidates: list[tuple[str, list[str]]] = []  # (uri, suites) of "deb" entries
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        candidates.extend(_parse_deb822(path.read_text(errors="replace")))
    one_line = [Path("/etc/apt/sources.list")]
    one_line += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for path in one_line:
        if path.is_file():
            candidates.extend(_parse_one_line(path.read_text(errors="replace")))
    for uri, suites in candidates:
        if suite in suites:
            return uri
    raise NspawnError(
        f"no 'deb' apt source for {suite} found in /etc/apt; "
        "set SPEGEL_NODE_TEST_MIRROR=http://MIRROR/debian"
    )


def _parse_deb822(text: str) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key is not None:  # continuation line
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        for uri in fields.get("uris", "").split():
            out.append((uri.rstrip("/"), fields.get("suites", "").split()))
    return out


def _parse_one_line(text: str) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0])  # drop [options]
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            out.append((words[1].rstrip("/"), [words[2]]))
    return out


# --------------------------------------------------------------------------------------------
# base image


def _recipe_hash() -> str:
    recipe = {
        "suite": SUITE,
        "variant": "minbase",
        "include": sorted(BASE_PACKAGES),
        "disabled": sorted(BASE_DISABLED_UNITS),
        "dpkg_excludes": DPKG_EXCLUDES,
        "version": _RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def base_image_path() -> Path:
    """Where ``ensure_base_image()`` keeps the image for the current recipe."""
    return CACHE_DIR / f"base-{SUITE}-{_recipe_hash()}"


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_tree(dest: Path, kind: str, build: Callable[[Path], None]) -> Path:
    """`dest` under CACHE_DIR, built once by `build(tmp)` into a temp dir that is renamed into
    place (so a killed build leaves no half tree). Concurrent callers of one `kind` ("base",
    "pyvers-bullseye": the start of `dest`'s name) wait on its lock; the temp dirs of its killed
    builds are removed first."""
    if dest.is_dir():
        return dest
    with _flock(CACHE_DIR / f".{kind}.lock"):
        if dest.is_dir():  # built by another process while we waited for the lock
            return dest
        # Holding the lock, any temp build dir is a leftover of a killed build.
        for leftover in CACHE_DIR.glob(f".tmp-{kind}-*"):
            _remove_tree(leftover)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=CACHE_DIR))
        try:
            build(tmp)
            tmp.chmod(0o755)
            tmp.rename(dest)
        finally:
            if tmp.exists():
                _remove_tree(tmp)
    return dest


def ensure_base_image(*, timeout: float = 1800.0) -> Path:
    """Return the cached base tree, debootstrapping it first if it does not exist yet."""
    base = base_image_path()
    log = CACHE_DIR / f"{base.name}.log"
    return cached_tree(base, "base", lambda tmp: _debootstrap(tmp, log, timeout))


def debootstrap_minbase(
    suite: str, packages: Sequence[str], target: Path, log: Path, timeout: float
) -> None:
    """`debootstrap --variant=minbase` of `suite` with `packages` into `target`, from the mirror
    this machine's apt uses (it serves the other suites too); the command and its output go to
    `log`; NspawnError with the log's tail when it fails or takes longer than `timeout`."""
    mirror = apt_mirror()
    argv = ["debootstrap", "--variant=minbase", "--include=" + ",".join(packages),
            suite, str(target), mirror]  # fmt: skip
    with open(log, "w") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise NspawnError(
                f"debootstrap {suite} took longer than {timeout:.0f}s; see {log}"
            ) from exc
    if proc.returncode != 0:
        inner = target / "debootstrap" / "debootstrap.log"
        detail = _tail(inner.read_text(errors="replace")) if inner.is_file() else ""
        raise NspawnError(
            f"debootstrap {suite} failed ({proc.returncode}) from {mirror}; see {log}\n"
            f"{_tail(log.read_text(errors='replace'))}\n{detail}"
        )


def _debootstrap(target: Path, log: Path, timeout: float) -> None:
    started, mirror = time.monotonic(), apt_mirror()
    debootstrap_minbase(SUITE, BASE_PACKAGES, target, log, timeout)
    # Every node gets its own machine-id (systemd-machine-id-setup --root at copy time).
    (target / "etc" / "machine-id").unlink(missing_ok=True)
    dbus_id = target / "var" / "lib" / "dbus" / "machine-id"
    if dbus_id.is_file() and not dbus_id.is_symlink():
        dbus_id.unlink()
    subprocess.run(
        ["systemctl", f"--root={target}", "disable", *BASE_DISABLED_UNITS],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    for deb in (target / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()
    # apt_install() runs apt-get update first; the lists are 50 MB per node otherwise.
    for lst in (target / "var" / "lib" / "apt" / "lists").glob("*_*"):
        lst.unlink()
    (target / "etc" / "dpkg" / "dpkg.cfg.d" / "01-spegel-node-test-nodoc").write_text(DPKG_EXCLUDES)
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale"):
        top = target / sub
        for entry in top.glob("*") if top.is_dir() else []:
            if sub == "usr/share/doc" and entry.is_dir() and (entry / "copyright").exists():
                for f in entry.iterdir():
                    if f.name != "copyright":
                        _remove_entry(f)
            elif entry.name != "locale.alias":
                _remove_entry(entry)
    with open(log, "a") as out:
        out.write(f"built in {time.monotonic() - started:.1f}s from {mirror}\n")


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# --------------------------------------------------------------------------------------------
# cgroups, processes, trees


def _cgroup_roots() -> list[Path]:
    """The hierarchies a launcher is placed in: name=systemd (v1) and unified (v2)."""
    roots = [p for p in (CGROUP_V1_SYSTEMD, CGROUP_UNIFIED) if (p / "cgroup.procs").is_file()]
    if not roots and Path("/sys/fs/cgroup/cgroup.controllers").is_file():
        roots = [Path("/sys/fs/cgroup")]  # a pure cgroup v2 host
    return roots


def _cgroup_pids(cgroup: Path) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(cgroup):
        with contextlib.suppress(OSError):
            text = (Path(dirpath) / "cgroup.procs").read_text()
            pids.extend(int(p) for p in text.split())
    return pids


def _kill_cgroup(cgroup: Path, deadline: float) -> None:
    """SIGKILL every process left in ``cgroup`` (by PID) until the subtree is empty."""
    while cgroup.is_dir():
        pids = _cgroup_pids(cgroup)
        if not pids:
            return
        if time.monotonic() > deadline:
            raise NspawnError(f"processes {pids} still in {cgroup}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _remove_cgroup(cgroup: Path, deadline: float) -> None:
    """rmdir a cgroup and everything below it, deepest first (retrying while it drains)."""
    while cgroup.is_dir():
        try:
            for dirpath, _dirs, _files in os.walk(cgroup, topdown=False):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(dirpath)
        except OSError as exc:  # EBUSY while the last processes exit
            if time.monotonic() > deadline:
                raise NspawnError(f"cannot remove cgroup {cgroup}: {exc}") from exc
            time.sleep(0.05)


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def _mount_points_below(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/")
    found: list[str] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """``rm -rf`` a node or build tree, never crossing into a mount left inside it."""
    if not path.exists() and not path.is_symlink():
        return
    for point in _mount_points_below(path):  # e.g. /proc of a killed debootstrap
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


def _ensure_session_nodes_dir(path: Path) -> None:
    """The session's node dir: a tmpfs of its own (unless ``$SPEGEL_NODE_TEST_TMPFS=0``).

    Copying the base into RAM takes well under a second; onto this machine's disk it took 3-9 s
    per node. A tmpfs of our own (not /dev/shm, often ``nosuid,nodev``) keeps setuid binaries
    and device nodes in the node working. Costs about 300 MB of RAM per running node.
    """
    path.mkdir(parents=True, exist_ok=True)
    if NODES_ON_TMPFS and not os.path.ismount(path):
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "mode=0755", "spegel-node-test-nodes", str(path)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip


def _release_session_nodes_dir(path: Path) -> None:
    """Unmount and remove the session's node dir once its last node is gone."""
    with contextlib.suppress(FileNotFoundError):
        if any(path.iterdir()):
            return
    _remove_tree(path)


def _terminate_nspawn(pid: int, wait: Callable[[float], bool], orderly: float) -> str:
    """TERM; bounded wait; TERM again; bounded wait; KILL. Returns a note unless orderly.

    systemd-nspawn turns the first SIGTERM into a halt request to the node's systemd
    (SIGRTMIN+3) and a second one into immediate termination (it kills the node and still
    removes its lock files).
    """
    steps = (
        (signal.SIGTERM, orderly, ""),
        (signal.SIGTERM, 10.0, f"no orderly halt within {orderly:g}s; sent TERM again"),
        (signal.SIGKILL, 10.0, "systemd-nspawn ignored a second TERM; killed"),
    )
    for sig, seconds, note in steps:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return note
        if wait(seconds):
            return note
    raise NspawnError(f"systemd-nspawn {pid} survived SIGKILL")


def _psutil_waiter(process: psutil.Process) -> Callable[[float], bool]:
    def wait(seconds: float) -> bool:
        try:
            process.wait(timeout=seconds)
        except psutil.TimeoutExpired:
            return False
        except psutil.NoSuchProcess:
            pass
        return True

    return wait


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime


_SESSION_GROUP: str | None = None
_LIVE_NODES: dict[int, NspawnNode] = {}  # launched and not yet stopped, by id()


@atexit.register
def _stop_forgotten_nodes() -> None:
    for node in list(_LIVE_NODES.values()):
        with contextlib.suppress(Exception):
            node.stop()


def session_group() -> str:
    """This process's cgroup group name; leftovers of dead earlier runs are cleaned first."""
    global _SESSION_GROUP
    if _SESSION_GROUP is None:
        cleanup_leftovers()
        _SESSION_GROUP = f"{GROUP_PREFIX}{os.getpid()}-{_start_time(os.getpid())}"
    return _SESSION_GROUP


def _group_owner_alive(group: str) -> bool:
    match = re.fullmatch(re.escape(GROUP_PREFIX) + r"(\d+)-(\d+)", group)
    if not match:
        return False
    return _start_time(int(match[1])) == int(match[2])


def cleanup_leftovers() -> list[str]:
    """Kill and remove what crashed earlier runs of this harness left behind.

    Only groups named ``spegel-node-test-<pid>-<starttime>`` whose owner process is gone are
    touched. Returns the groups cleaned.
    """
    cleaned: set[str] = set()
    deadline = time.monotonic() + 30
    for root in _cgroup_roots():
        for group in root.glob(GROUP_PREFIX + "*"):
            if group.is_dir() and not _group_owner_alive(group.name):
                for pid in _cgroup_pids(group):  # let nspawn itself tear its node down first
                    with contextlib.suppress(psutil.Error):
                        process = psutil.Process(pid)
                        if process.name() == "systemd-nspawn":
                            _terminate_nspawn(pid, _psutil_waiter(process), 5.0)
                _kill_cgroup(group, deadline)
                _remove_cgroup(group, deadline)
                cleaned.add(group.name)
    nodes = CACHE_DIR / "nodes"
    if nodes.is_dir():
        for tree in nodes.glob(GROUP_PREFIX + "*"):
            if not _group_owner_alive(tree.name):
                _remove_tree(tree)
                cleaned.add(tree.name)
    return sorted(cleaned)


def our_leftovers() -> list[str]:
    """Cgroup dirs, node trees and nspawn processes of this session that still exist."""
    found: list[str] = []
    if _SESSION_GROUP is None:
        return found
    for root in _cgroup_roots():
        if (root / _SESSION_GROUP).exists():
            found.append(str(root / _SESSION_GROUP))
    tree = CACHE_DIR / "nodes" / _SESSION_GROUP
    if tree.exists():
        found.append(str(tree))
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "systemd-nspawn" and any(_SESSION_GROUP in a for a in cmdline):
            found.append(f"pid {proc.pid}: {' '.join(cmdline)}")
    return found


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# nodes


class NspawnNode:
    """One booted Debian node (systemd as PID 1) under systemd-nspawn.

    ``with NspawnNode("node1", ensure_base_image()) as node:`` boots it; leaving the block stops
    it and removes everything it made. Attributes: ``root`` (the node's tree on the host),
    ``leader`` (host PID of the node's PID 1), ``state`` (``running`` or ``degraded``),
    ``failed_units``, ``timings`` (seconds: ``copy``, ``boot``, ``stop``).
    """

    def __init__(self, name: str, base: Path, *, boot_timeout: float = 90.0) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"node name {name!r}: use [a-z0-9-], at most 40 characters")
        self.name = name
        self.base = Path(base)
        self.boot_timeout = boot_timeout
        self.group = session_group()
        self.root = CACHE_DIR / "nodes" / self.group / name
        self.log_path = CACHE_DIR / "nodes" / self.group / f"{name}.nspawn.log"
        self.cgroups = [root / self.group / name for root in _cgroup_roots()]
        self.process: subprocess.Popen[bytes] | None = None
        self._leader: int | None = None
        self.state = ""
        self.failed_units: list[str] = []
        self.timings: dict[str, float] = {}
        self._launched_at = 0.0
        self._prepared = False
        self._stopped = False

    def __repr__(self) -> str:
        return f"NspawnNode({self.name!r}, leader={self._leader}, state={self.state!r})"

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> NspawnNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> NspawnNode:
        """Copy, launch and wait until booted; on any failure everything is cleaned up."""
        try:
            self.launch()
            self.wait_booted()
        except BaseException:
            self.stop()
            raise
        return self

    def prepare(self) -> None:
        """Copy the base to the node's tree, set its hostname and a fresh machine-id."""
        if self._prepared:
            return
        if not (self.base / "usr" / "lib" / "systemd" / "systemd").exists():
            raise NspawnError(f"{self.base} is not a base image (no systemd in it)")
        _ensure_session_nodes_dir(self.root.parent)
        if self.root.exists():
            raise NspawnError(f"{self.root} exists: node name {self.name!r} used twice?")
        self._prepared = True  # from here on stop() has something to remove
        _LIVE_NODES[id(self)] = self
        t0 = time.monotonic()
        subprocess.run(
            ["cp", "-a", "--reflink=auto", str(self.base), str(self.root)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        (self.root / "etc" / "hostname").write_text(self.name + "\n")
        (self.root / "etc" / "machine-id").unlink(missing_ok=True)
        subprocess.run(
            ["systemd-machine-id-setup", f"--root={self.root}"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        self.timings["copy"] = time.monotonic() - t0

    def launch(self) -> None:
        """Prepare (if not yet) and exec systemd-nspawn; does not wait for the boot."""
        if self.process is not None:
            raise NspawnError(f"{self.name}: already launched")
        self.prepare()
        procs = []
        for cgroup in self.cgroups:
            cgroup.mkdir(parents=True)
            procs.append(str(cgroup / "cgroup.procs"))
        # The launcher writes its own PID into each cgroup, then execs nspawn (same PID).
        launcher = (
            'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 97; shift; '
            'n=$((n-1)); done; exec "$@"'
        )
        argv = [
            "sh", "-c", launcher, "sh", str(len(procs)), *procs,
            "systemd-nspawn", "-D", str(self.root), "-M", self.name, *NSPAWN_FLAGS,
        ]  # fmt: skip
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        self._launched_at = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches us, we stop the node
            )  # fmt: skip

    def wait_booted(self) -> None:
        """Bounded poll until ``systemctl is-system-running`` says running or degraded."""
        deadline = self._launched_at + self.boot_timeout
        self._leader = self._wait_leader(deadline)
        state = ""
        while True:
            self._check_alive()
            try:
                proc = self.run("systemctl", "is-system-running", check=False, timeout=10)
                state = proc.stdout.strip()
            except subprocess.TimeoutExpired:
                state = "(is-system-running timed out)"
            if state in ("running", "degraded"):
                break
            if state == "maintenance":  # emergency/rescue mode: it will not get better
                raise NspawnError(self._boot_failure(f"booted into {state}"))
            if time.monotonic() > deadline:
                raise NspawnError(
                    self._boot_failure(f"not booted after {self.boot_timeout:.0f}s: {state!r}")
                )
            time.sleep(0.1)
        self.timings["boot"] = time.monotonic() - self._launched_at
        self.state = state
        if state == "degraded":
            self.failed_units = self.list_failed_units()
            warnings.warn(
                f"nspawn node {self.name} booted degraded; failed units: "
                f"{', '.join(self.failed_units) or '(none listed)'}",
                stacklevel=2,
            )

    def _wait_leader(self, deadline: float) -> int:
        """The node's PID 1: nspawn's child in its own PID namespace, once it runs systemd."""
        assert self.process is not None
        own_pidns = os.readlink("/proc/self/ns/pid")
        while True:
            self._check_alive()
            with contextlib.suppress(psutil.Error, OSError):
                for child in psutil.Process(self.process.pid).children():
                    if (
                        os.readlink(f"/proc/{child.pid}/ns/pid") != own_pidns
                        and child.name() == "systemd"
                    ):
                        return child.pid
            if time.monotonic() > deadline:
                raise NspawnError(self._boot_failure("no leader process appeared"))
            time.sleep(0.02)

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise NspawnError(
                self._boot_failure(f"systemd-nspawn exited with {self.process.returncode}")
            )

    def _boot_failure(self, what: str) -> str:
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"nspawn node {self.name}: {what}\n--- nspawn output (tail) ---\n{_tail(log, 40)}"

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the node and remove everything it made.

        TERM to nspawn (it asks the node's systemd to halt), bounded wait; then TERM again
        (nspawn kills the node at once and cleans up after itself); then KILL.

        Idempotent; safe after a failed or partial start.
        """
        if self._stopped:
            return
        self._stopped = True
        _LIVE_NODES.pop(id(self), None)
        t0 = time.monotonic()
        errors: list[str] = []
        proc = self.process
        if proc is not None and proc.poll() is None:

            def wait(seconds: float) -> bool:
                try:
                    proc.wait(timeout=seconds)
                except subprocess.TimeoutExpired:
                    return False
                return True

            # A node that never finished booting may not act on the halt request yet.
            orderly = timeout if self.state else 2.0
            try:
                note = _terminate_nspawn(proc.pid, wait, orderly)
            except NspawnError as exc:
                errors.append(str(exc))
            else:
                if note and self.state:
                    warnings.warn(f"nspawn node {self.name}: {note}", stacklevel=2)
        # The lock file nspawn keeps beside the tree (left behind if nspawn was killed).
        self.root.with_name(f".#{self.name}.lck").unlink(missing_ok=True)
        deadline = time.monotonic() + 15
        for cgroup in self.cgroups:  # deepest first: cgroups the node's systemd made, ours
            try:
                _kill_cgroup(cgroup, deadline)
                _remove_cgroup(cgroup, deadline)
                _rmdir_if_empty(cgroup.parent)  # the session group, once its last node is gone
            except NspawnError as exc:
                errors.append(str(exc))
        if self._prepared:
            _remove_tree(self.root)
            self.log_path.unlink(missing_ok=True)
            _release_session_nodes_dir(self.root.parent)
        self.timings["stop"] = time.monotonic() - t0
        self._leader = None
        if errors:
            raise NspawnError(f"nspawn node {self.name}: " + "; ".join(errors))

    # -- using the node -------------------------------------------------------------------

    @property
    def leader(self) -> int:
        if self._leader is None:
            raise NspawnError(f"nspawn node {self.name} is not running")
        return self._leader

    def path(self, node_path: str) -> Path:
        """The host path of ``node_path`` inside this node's tree."""
        return self.root / node_path.lstrip("/")

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
        host_network: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the node: ``nsenter -t LEADER -a -- argv``.

        The environment is a clean one (PATH, LANG, HOME plus ``env``), not the test's.
        ``host_network=True`` enters all namespaces but the network one (``-m -u -i -p``), so
        the command uses the host's network (apt to the Debian mirror); the node itself only
        has ``lo``.
        """
        ns = ["-m", "-u", "-i", "-p"] if host_network else ["-a"]
        full = ["nsenter", "-t", str(self.leader), *ns, "--", *argv]
        clean = {"PATH": NODE_PATH, "LANG": "C.UTF-8", "HOME": "/root", "SYSTEMD_PAGER": ""}
        proc = subprocess.run(
            full, input=input, capture_output=True, text=True, timeout=timeout,
            env=clean | (env or {}), check=False,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise NodeCommandError(self.name, proc)
        return proc

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def list_failed_units(self) -> list[str]:
        out = self.systemctl("list-units", "--failed", "--plain", "--no-legend", check=False)
        return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]

    def journal(self, unit: str) -> str:
        """This boot's journal of ``unit``."""
        return self.run(
            "journalctl", "--no-pager", "-b", "-o", "short-precise", "-u", unit, check=False
        ).stdout

    def wait_for(
        self, predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05
    ) -> T:
        """Poll ``predicate`` until it returns something truthy (returned), or time out."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"nspawn node {self.name}: no {what} after {timeout:g}s")
            time.sleep(interval)

    def replace_file(self, node_path: str, data: str | bytes, mode: int = 0o644) -> Path:
        """Write a file from the host by renaming a new file over it (what inotify sees)."""
        target = self.path(node_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        raw = data.encode() if isinstance(data, str) else data
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def apt_install(self, *packages: str, timeout: float = 600.0) -> None:
        """apt-get install in the node, through the host's network namespace."""
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        self.run("apt-get", "update", "-qq", host_network=True, env=env, timeout=timeout)
        self.run(
            "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages,
            host_network=True, env=env, timeout=timeout,
        )  # fmt: skip

    def install_wheelhouse(
        self,
        wheel_dir: Path,
        venv: str = "/opt/spegel-node",
        packages: Sequence[str] = ("spegel-node",),
    ) -> str:
        """Copy ``wheel_dir`` into the node, make ``venv`` and pip-install ``packages`` offline.

        Returns ``venv`` (a node path).
        """
        wheels = "/var/tmp/spegel-node-wheelhouse"
        dest = self.path(wheels)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(wheel_dir, dest)
        self.run("python3", "-m", "venv", venv)
        self.run(
            f"{venv}/bin/pip", "install", "--no-index", "--find-links", wheels, *packages,
            env={"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"},
        )  # fmt: skip
        return venv


@contextlib.contextmanager
def boot_nodes(base: Path, *names: str, boot_timeout: float = 90.0) -> Iterator[list[NspawnNode]]:
    """Boot several nodes at once (all launched, then all waited for); stop them all on exit."""
    with contextlib.ExitStack() as stack:
        nodes = [NspawnNode(name, base, boot_timeout=boot_timeout) for name in names]
        for node in nodes:
            stack.callback(node.stop)
        for node in nodes:  # copy all first, so each boot time is the boot alone
            node.prepare()
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_booted()
        yield nodes


# --------------------------------------------------------------------------------------------
# wheelhouse


def _source_hash(repo: Path) -> str:
    h = hashlib.sha256(f"{sys.version_info[:2]}".encode())
    files = [repo / "pyproject.toml", *sorted(repo.glob("README*")), *sorted(repo.glob("LICENSE*"))]
    files += sorted(
        p for p in (repo / "src").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    for path in files:
        if path.is_file():
            h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_wheelhouse(repo: Path, dest: Path, *, timeout: float = 600.0) -> Path:
    """``pip wheel --wheel-dir dest repo``: the project and all its dependencies as wheels.

    Uses the pip of the interpreter running the tests (the host venv's). Results are cached by
    a hash of the project's sources (``<cache>/wheelhouse/<hash>``), then copied to ``dest``.
    """
    repo = Path(repo).resolve()
    cache = CACHE_DIR / "wheelhouse" / _source_hash(repo)
    if not cache.is_dir():
        with _flock(CACHE_DIR / ".wheelhouse.lock"):
            if not cache.is_dir():
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cache.name}-", dir=cache.parent))
                try:
                    proc = subprocess.run(
                        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(tmp),
                         str(repo)],
                        capture_output=True, text=True, timeout=timeout, check=False,
                    )  # fmt: skip
                    if proc.returncode != 0:
                        raise NspawnError(f"pip wheel {repo} failed:\n{_tail(proc.stderr)}")
                    tmp.chmod(0o755)
                    tmp.rename(cache)
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp)
                # The sources change often; keep only the few newest wheelhouses.
                built = sorted(
                    (p for p in cache.parent.iterdir() if not p.name.startswith(".")),
                    key=lambda p: p.stat().st_mtime,
                    reverse=True,
                )
                for old in built[WHEELHOUSES_KEPT:]:
                    shutil.rmtree(old, ignore_errors=True)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in cache.glob("*.whl"):
        shutil.copy2(wheel, dest / wheel.name)
    return dest

"""`spegel-node run`: the long-running reconciler (a pod, or a systemd service).

It watches the hosts dir and every registry dir in it (inotify through libc, no dependency) and,
once the events have been quiet for a few milliseconds, runs the same apply as the command,
keeping the gate as the last probe left it. Every `probe_interval` it probes `/v2/` through the
same apply (the gate's one path), backing off while the mirror is withdrawn. SIGTERM ends it
(exit 0), SIGHUP reloads the config (a bad one is logged and the last good one kept).

One structured line per event on stderr (`key=value`), with a `<N>` syslog priority prefix when
stderr is journald's (JOURNAL_STREAM), so `journalctl -p` filters it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spegel_node.errors import BadInput, SpegelNodeError
from spegel_node.godur import go_duration_seconds
from spegel_node.layout import Layout
from spegel_node.node import Node
from spegel_node.settings import Settings

DEBOUNCE_S = 0.005  # quiet time after the last event before applying
DEBOUNCE_MAX_S = 0.1  # a steady stream of events still gets an apply this often
BACKOFF_MAX_S = 60.0
# A full apply (hosts dir scanned, record read) at least this often even when nothing changed:
# the safety net for an event inotify could not give (a queue overflow, a state record changed
# by hand). Between them a probe that finds the mirror as healthy as the gate already has it is
# only the /v2/ request, about 0.7 ms of CPU (docs/performance.md, "idle CPU").
RESYNC_S = 300.0
# `--textfile`: doctor runs (in a thread, one at a time) at the first cycle and then at the
# first cycle (probe or change) at least this long after the last run began. A doctor run costs
# about 7-10 ms of CPU on a quiet node (more where it asks containerd and crictl): at every 10 s
# probe that alone would be 60-90 CPU-s a day; once a minute it measured 15 (idle_cpu.py).
TEXTFILE_INTERVAL_S = 60.0

# <linux/inotify.h>
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
WATCH_MASK = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)

_PRIORITIES = {"error": 3, "warning": 4, "info": 6, "debug": 7}

Loader = Callable[[], tuple[Settings, Layout]]


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def log(event: str, level: str = "info", **fields: object) -> None:
    """One line per event: `spegel-node: level=info event=apply changed=1 ...`."""
    prefix = f"<{_PRIORITIES[level]}>" if os.environ.get("JOURNAL_STREAM") else ""
    parts = [f"level={level}", f"event={event}"]
    parts += [f"{k}={_quote(v)}" for k, v in fields.items()]
    print(f"{prefix}spegel-node: {' '.join(parts)}", file=sys.stderr, flush=True)


class Inotify:
    """inotify(7) through libc: one fd, one watch per directory, events only as a wake-up."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(name, use_errno=True)
        self._libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def watch(self, path: Path) -> bool:
        """Watch one directory; False when it is not there (or not a directory)."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), WATCH_MASK)
        return bool(wd >= 0)

    def drain(self) -> int:
        """Read every pending event; how many bytes were read (0: none)."""
        total = 0
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return total
            if not chunk:
                return total
            total += len(chunk)

    def close(self) -> None:
        os.close(self.fd)


def watch_tree(inotify: Inotify, hosts_path: Path) -> int:
    """The hosts dir and each registry dir in it (re-run after every apply: dirs come and go).
    Adding a watch twice is harmless (same descriptor). With no hosts dir yet, watch the nearest
    existing parent so its creation wakes us."""
    if not inotify.watch(hosts_path):
        for parent in hosts_path.parents:
            if inotify.watch(parent):
                return 1
        return 0
    count = 1
    with contextlib.suppress(OSError), os.scandir(hosts_path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and inotify.watch(Path(entry.path)):
                count += 1
    return count


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) READY=1 / STOPPING=1 / STATUS=...; nothing without NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())


@dataclass
class Backoff:
    """The probe schedule: every interval while the mirror is advertised; doubling (up to a
    minute, never below the interval) while it is withdrawn."""

    interval: float
    streak: int = 0

    def next_delay(self, withdrawn: bool) -> float:
        if not withdrawn:
            self.streak = 0
            return self.interval
        self.streak += 1
        cap = max(self.interval, BACKOFF_MAX_S)
        return float(min(self.interval * 2 ** min(self.streak, 16), cap))


@contextlib.contextmanager
def _signal_pipe() -> Iterator[int]:
    """SIGTERM/SIGINT/SIGHUP wake the poll loop through a pipe (signal.set_wakeup_fd)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = {s: signal.signal(s, lambda *_: None) for s in _SIGNALS}
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    try:
        yield r
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(r)
        os.close(w)


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Reconciler:
    inotify: Inotify  # set by loop()

    def __init__(
        self,
        node: Node,
        loader: Loader,
        *,
        use_gate: bool,
        ready_file: Path | None,
        textfile: Path | None = None,
        doctor_only: bool = False,
    ) -> None:
        self.node = node
        self.loader = loader
        self.use_gate = use_gate
        self.ready_file = ready_file
        if textfile is not None and not textfile.parent.is_dir():
            raise BadInput(f"--textfile {textfile}: directory {textfile.parent} does not exist")
        self.textfile = textfile
        self.doctor_only = doctor_only
        if textfile is not None or doctor_only:  # imported now: the first run costs no more
            import spegel_node.doctor
            import spegel_node.doctor.promtext  # noqa: F401
        self._doctor: threading.Thread | None = None
        self._doctor_started = -float("inf")
        self.settings, self.layout = loader()  # BadInput here: exit 2 at the edge
        self.backoff = Backoff(go_duration_seconds(self.settings.probe_interval))
        self.applies = 0
        self.probes = 0  # probe cycles that were the /v2/ request alone
        self._steady = False  # the last full apply left the gate open with no failure counted
        self._last_full = -float("inf")
        self._mirror_url = ""  # the mirror the last full apply probed (node_ip resolved)

    @property
    def hosts_path(self) -> Path:
        from spegel_node.apply import hosts_dir_of

        return self.node.real_path(hosts_dir_of(self.layout))

    def apply(self, reason: str, reprobe: bool) -> bool:
        """Run apply; False when the gate has the mirror withdrawn. Errors are logged, not fatal."""
        from spegel_node.apply import apply_mirrors

        started = time.monotonic()
        try:
            outcome = apply_mirrors(
                self.node,
                self.layout,
                self.settings,
                use_gate=self.use_gate,
                reprobe=reprobe and self.use_gate,
            )
        except SpegelNodeError as e:
            log("apply", "error", reason=reason, error=e)
            return False
        except OSError as e:
            log("apply", "error", reason=reason, error=e.strerror or e)
            return False
        self.applies += 1
        self._last_full = time.monotonic()
        changed = len(outcome.plan.changes)
        withdrawn = bool(outcome.gate and outcome.gate.withdrawn)
        self._mirror_url = outcome.mirror_urls[0] if outcome.mirror_urls else ""
        self._steady = bool(
            self._mirror_url
            and self.use_gate
            and outcome.gate is not None
            and not outcome.gate.withdrawn
            and outcome.gate.consecutive_failures == 0
            and not outcome.plan.problems
        )
        fields: dict[str, object] = {"reason": reason, "changed": changed}
        if outcome.probe is not None:
            fields["probe"] = outcome.probe.detail
        if self.use_gate:
            fields["gate"] = "withdrawn" if withdrawn else "open"
        fields["ms"] = round((time.monotonic() - started) * 1000, 1)
        if changed or outcome.plan.problems or reason != "probe":
            level = "warning" if outcome.plan.problems or outcome.warnings else "info"
            for problem in outcome.plan.problems:
                log("problem", "warning", detail=problem)
            log("apply", level, **fields)
        else:
            log("probe", "debug", **fields)
        return not withdrawn

    def probe_cycle(self) -> bool:
        """A probe cycle; False when the gate has the mirror withdrawn. While the gate is open
        and the last full apply was clean, a /v2/ answering 200 changes nothing (the gate's next
        state is the one it has, the hosts dir is watched): that is the whole cycle. A failed
        probe, a withdrawn gate, or RESYNC_S since the last full apply: the full apply, which
        probes again and counts the failure (so a dead mirror costs one more probe, once)."""
        if not self.use_gate:  # nothing to probe: the cycle is the resync alone
            if time.monotonic() >= self._last_full + RESYNC_S:
                self.apply("resync", reprobe=False)
                watch_tree(self.inotify, self.hosts_path)
            return True
        if self._steady and time.monotonic() < self._last_full + RESYNC_S:
            from spegel_node import gate

            if gate.probe_v2(self._mirror_url).ok:  # no line: nothing happened (see `stop`)
                self.probes += 1
                return True
        advertised = self.apply("probe", reprobe=True)
        watch_tree(self.inotify, self.hosts_path)
        return advertised

    def maybe_textfile(self, now: float) -> None:
        """Start a doctor run (for the textfile, or doctor-only) when one is due and none is
        running."""
        if self.textfile is None and not self.doctor_only:
            return
        if now < self._doctor_started + TEXTFILE_INTERVAL_S:
            return
        if self._doctor is not None and self._doctor.is_alive():
            return
        self._doctor_started = now
        self._doctor = threading.Thread(
            target=self._write_textfile,
            args=(self.textfile, self.settings),
            name="doctor",
            daemon=True,
        )
        self._doctor.start()

    def _write_textfile(self, path: Path | None, settings: Settings) -> None:
        """doctor's checks, logged (the failed ids) and written as `doctor --textfile` writes
        them (atomic rename) when `path` is set."""
        from spegel_node.doctor import Facts, diagnose
        from spegel_node.doctor.promtext import render_textfile, write_textfile

        where = str(path) if path is not None else "-"
        try:
            run = diagnose(Facts(self.node, settings))
            if path is not None:
                text = render_textfile(run.results, run.duration_s, time.time(), run.ok)
                write_textfile(path, text)
        except (SpegelNodeError, OSError) as e:
            log("doctor", "error", textfile=where, error=e)
            return
        failed = [r.id for r in run.results if r.status.value == "fail"]
        level = "info" if run.ok else "warning"
        log("doctor", level, textfile=where, ok=int(run.ok), failed=",".join(failed) or "-")

    def reload(self) -> None:
        try:
            settings, layout = self.loader()
        except SpegelNodeError as e:
            log("reload", "error", error=e, kept=self.settings.source)
            return
        self.settings, self.layout = settings, layout
        self.backoff = Backoff(go_duration_seconds(settings.probe_interval))
        self._steady = False  # the next probe cycle is a full apply with the new config
        self._doctor_started = -float("inf")  # the next cycle refreshes the textfile
        log("reload", config=settings.source, probe_interval=settings.probe_interval)

    def mark_ready(self) -> None:
        if self.ready_file is not None:
            tmp = self.ready_file.with_name(self.ready_file.name + ".tmp")
            tmp.write_text(f"pid={os.getpid()}\n")
            tmp.replace(self.ready_file)
        sd_notify("READY=1")

    def clear_ready(self) -> None:
        sd_notify("STOPPING=1")
        if self.ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.ready_file.unlink()

    def loop(self) -> int:
        inotify = self.inotify = Inotify()
        try:
            with _signal_pipe() as sig_fd:
                return self._loop(inotify, sig_fd)
        finally:
            inotify.close()
            if self._doctor is not None:  # a textfile being written is finished (or abandoned)
                self._doctor.join(timeout=5.0)
            self.clear_ready()

    def _doctor_loop(self, sig_fd: int) -> int:
        """--doctor-only: doctor once every TEXTFILE_INTERVAL_S; nothing is written to the node
        (but the textfile, if asked) and nothing is watched."""
        log(
            "start",
            pid=os.getpid(),
            mode="doctor-only",
            config=self.settings.source,
            textfile=self.textfile or "-",
        )
        self.mark_ready()
        log("ready", watched_dirs=0, cpu_s=round(time.process_time(), 6))
        poller = select.poll()
        poller.register(sig_fd, select.POLLIN)
        while True:
            now = time.monotonic()
            self.maybe_textfile(now)
            due = self._doctor_started + TEXTFILE_INTERVAL_S
            if self._doctor is not None and self._doctor.is_alive():
                due = max(due, now + 1.0)  # still running: look again in a second, no spin
            for _ in poller.poll(max(0, int((due - time.monotonic()) * 1000) + 1)):
                code = self._signals(sig_fd)
                if code is not None:
                    log("stop", applies=0, cpu_s=round(time.process_time(), 6))
                    return code

    def _loop(self, inotify: Inotify, sig_fd: int) -> int:
        if self.doctor_only:
            return self._doctor_loop(sig_fd)
        log(
            "start",
            pid=os.getpid(),
            hosts_dir=self.node.display(self.hosts_path),
            config=self.settings.source,
            probe_interval=self.settings.probe_interval,
            gate="on" if self.use_gate else "off",
        )
        advertised = self.apply("start", reprobe=True)
        watched = watch_tree(inotify, self.hosts_path)
        inotify.drain()  # our own writes
        self.mark_ready()
        log("ready", watched_dirs=watched, cpu_s=round(time.process_time(), 6))
        self.maybe_textfile(time.monotonic())
        next_probe = time.monotonic() + self.backoff.next_delay(not advertised)
        poller = select.poll()
        poller.register(inotify.fd, select.POLLIN)
        poller.register(sig_fd, select.POLLIN)
        dirty_since: float | None = None
        last_event = 0.0
        while True:
            now = time.monotonic()
            deadline = next_probe
            if dirty_since is not None:
                deadline = min(deadline, last_event + DEBOUNCE_S, dirty_since + DEBOUNCE_MAX_S)
            timeout_ms = max(0, int((deadline - now) * 1000) + 1)
            for fd, _ in poller.poll(timeout_ms):
                if fd == sig_fd:
                    code = self._signals(sig_fd)
                    if code is not None:
                        log(
                            "stop",
                            applies=self.applies,
                            probes=self.probes,
                            cpu_s=round(time.process_time(), 6),
                        )
                        return code
                    dirty_since = dirty_since or time.monotonic()
                    last_event = time.monotonic()
                elif inotify.drain():
                    last_event = time.monotonic()
                    dirty_since = dirty_since or last_event
            now = time.monotonic()
            if dirty_since is not None and (
                now >= last_event + DEBOUNCE_S or now >= dirty_since + DEBOUNCE_MAX_S
            ):
                dirty_since = None
                self.apply("change", reprobe=False)
                watch_tree(inotify, self.hosts_path)
                self.maybe_textfile(time.monotonic())
            elif now >= next_probe:
                advertised = self.probe_cycle()
                next_probe = time.monotonic() + self.backoff.next_delay(not advertised)
                self.maybe_textfile(time.monotonic())

    def _signals(self, sig_fd: int) -> int | None:
        """Handle the signals that woke us: an exit code to stop with, or None to go on."""
        try:
            data = os.read(sig_fd, 512)
        except BlockingIOError:
            return None
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log("signal", signal=signal.Signals(signum).name)
                return 0
        if signal.SIGHUP in data:
            log("signal", signal="SIGHUP")
            self.reload()
        return None


def run_reconciler(
    node: Node,
    loader: Loader,
    *,
    use_gate: bool = True,
    ready_file: Path | None = None,
    textfile: Path | None = None,
    doctor_only: bool = False,
) -> int:
    """Exit 2 (BadInput, raised) on a bad config at start; 0 on SIGTERM."""
    try:
        reconciler = Reconciler(
            node,
            loader,
            use_gate=use_gate,
            ready_file=ready_file,
            textfile=textfile,
            doctor_only=doctor_only,
        )
    except BadInput:
        raise
    return reconciler.loop()

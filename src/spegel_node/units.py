"""The systemd units that keep the mirror right: a timer and a path unit that run `apply`.

This module holds the one canonical text of `spegel-node-repair.{service,timer,path}`; the files
in the repository's `systemd/` are its rendering for plain containerd (a test keeps them equal).
`install-units` renders them with this node's paths and writes the ones that changed.

Why the path unit lists files: inotify is not recursive. A watch on the hosts dir sees registry
dirs appear and vanish, but not `ghcr.io/hosts.toml` being replaced inside one, so each mirrored
registry's `hosts.toml` is watched itself, under every dir name containerd looks up
(`host_port_`, then `host:port`), whether or not it exists yet. Writes made by the service itself
do not trigger it again: systemd drops a path unit's watches while the unit it starts is active.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spegel_node import fsutil, hostsdir
from spegel_node.changes import FileChange
from spegel_node.errors import BadInput, Refused
from spegel_node.hostsdir_rules import HOSTS_TOML
from spegel_node.node import STATE_DIR, Node
from spegel_node.plan import HostsSnapshot, targets
from spegel_node.registry import Registry

SERVICE = "spegel-node-repair.service"
TIMER = "spegel-node-repair.timer"
PATH = "spegel-node-repair.path"
UNIT_NAMES = (SERVICE, TIMER, PATH)
RUN_SERVICE = "spegel-node.service"  # --mode service: one long-running `run`
DOCTOR_SERVICE = "spegel-node-doctor.service"  # --textfile: doctor every minute
DOCTOR_TIMER = "spegel-node-doctor.timer"
DOCTOR_UNIT_NAMES = (DOCTOR_SERVICE, DOCTOR_TIMER)
DEFAULT_UNIT_DIR = "/etc/systemd/system"
UNIT_MODE = 0o644
# A path systemd takes literally in ExecStart=, ReadWritePaths= and PathChanged=: no whitespace,
# quotes, backslashes or `%` (specifiers); registry dirs such as `[::1]:5000` pass.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._:@+=,~\[\]/-]*$")

_HEADER = """\
# Rendered by `spegel-node install-units` for hosts dir {hosts_dir}.
# Run it again after changing the registries or the hosts dir; put local changes in a drop-in
# ({name}.d/*.conf), since this file is replaced.
"""

# Shared by every service (logrotate's and fwupd's units as the model): nothing but the paths
# named in ReadWritePaths= is writable; no capabilities, no new privileges, no namespaces.
HARDENING = """\
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateIPC=yes
PrivateMounts=yes
ProtectProc=invisible
NoNewPrivileges=yes
CapabilityBoundingSet=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# AF_NETLINK: node_ip = "auto" reads the interface addresses.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
"""

SERVICE_TEMPLATE = """\
[Unit]
Description=spegel-node: keep the Spegel mirror first in containerd's hosts.toml
After=network-online.target containerd.service
Wants=network-online.target
# The timer and the path unit start it; their own limits bound how often.
StartLimitIntervalSec=0

[Service]
Type=oneshot
ExecStart={exec_start}
Environment=PYTHONDONTWRITEBYTECODE=1
TimeoutStartSec=2min
UMask=0022
StateDirectory=spegel-node
StateDirectoryMode=0700
ProtectSystem=strict
ReadWritePaths={read_write_paths}
{hardening}# @chown (back from @privileged): a replaced hosts.toml keeps its owner; root's files need no
# capability for that. Files of other users would need CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE.
SystemCallFilter=@chown
SystemCallErrorNumber=EPERM
"""

TIMER_TEMPLATE = """\
[Unit]
Description=spegel-node: run apply soon after boot, then every minute

[Timer]
OnBootSec=30s
OnUnitActiveSec=1min
RandomizedDelaySec=10s
AccuracySec=1s
Unit=spegel-node-repair.service

[Install]
WantedBy=timers.target
"""

PATH_TEMPLATE = """\
[Unit]
Description=spegel-node: run apply when a mirrored registry's hosts.toml changes

[Path]
{path_changed}
Unit=spegel-node-repair.service
# A writer that fights the agent stops the path unit after 30 runs a minute; the timer goes on.
TriggerLimitIntervalSec=1min
TriggerLimitBurst=30

[Install]
WantedBy=paths.target
"""


DOCTOR_SERVICE_TEMPLATE = """\
[Unit]
Description=spegel-node doctor: write the node's check results for node_exporter's textfile collector
After=network-online.target containerd.service
Wants=network-online.target
StartLimitIntervalSec=0

[Service]
Type=oneshot
ExecStart={exec_start}
# Exit 1 is "a check failed": the textfile says which; only bad input (2) fails the unit.
SuccessExitStatus=1
Environment=PYTHONDONTWRITEBYTECODE=1 NO_COLOR=1
TimeoutStartSec=1min
UMask=0022
# Read-only everywhere (doctor writes nothing on the node) but the textfile's directory.
ProtectSystem=strict
ReadWritePaths={read_write_paths}
{hardening}SystemCallErrorNumber=EPERM
"""

DOCTOR_TIMER_TEMPLATE = """\
[Unit]
Description=spegel-node doctor: refresh the textfile metrics every minute

[Timer]
OnBootSec=1min
OnUnitActiveSec=1min
RandomizedDelaySec=10s
AccuracySec=1s
Unit=spegel-node-doctor.service

[Install]
WantedBy=timers.target
"""


@dataclass(frozen=True)
class UnitParams:
    """What the units depend on: node paths only."""

    exec_path: str  # the spegel-node executable on the node
    hosts_dir: str
    watch: tuple[str, ...]  # PathChanged= entries, the hosts dir first
    config: str | None = None  # an explicit --config for apply (node path)
    mode: str = "timer"  # "timer": repair service + timer + path; "service": one `run` service
    textfile: str | None = None  # node path: also spegel-node-doctor.{service,timer}

    @property
    def exec_start(self) -> str:
        command = "run" if self.mode == "service" else "apply"
        argv = [self.exec_path, command, "--hosts-dir", self.hosts_dir]
        if self.config:
            argv += ["--config", self.config]
        return " ".join(argv)

    @property
    def doctor_exec_start(self) -> str:
        argv = [self.exec_path, "doctor", "--hosts-dir", self.hosts_dir]
        if self.config:
            argv += ["--config", self.config]
        argv += ["--textfile", str(self.textfile)]
        return " ".join(argv)


def is_unit_safe(path: str) -> bool:
    return bool(_SAFE_PATH.match(path)) and "/../" not in f"{path}/" and "//" not in path


def unit_path(value: str, what: str) -> str:
    """`value` if systemd takes it literally as a path in a unit file; otherwise BadInput."""
    if not is_unit_safe(value):
        raise BadInput(
            f"{what} {value!r} cannot be written into a systemd unit: use an absolute path of "
            "letters, digits and ._:@+=,~[]/- only"
        )
    return value


def watch_paths(
    hosts_dir: str, registries: Sequence[Registry], snapshot: HostsSnapshot
) -> tuple[list[str], list[str]]:
    """The PathChanged= entries (the hosts dir, then each mirrored registry's hosts.toml), and
    the paths left out because systemd cannot take them literally.

    For a registry every dir containerd may read is watched (`host_port_` and `host:port`), so
    the list does not depend on which of them exists. With no registries (`_default` mode) the
    targets are `_default` and every registry dir that exists now (as `apply` sees them); dirs
    created later are seen by the hosts dir watch, and by the next `install-units`.
    """
    if registries:
        names = [name for registry in registries for name in registry.dir_names]
    else:
        names = [target.dir_name for target in targets((), snapshot)]
    files = [f"{hosts_dir}/{name}/{HOSTS_TOML}" for name in dict.fromkeys(names)]
    watched = [unit_path(hosts_dir, "hosts dir")]
    watched += [p for p in files if is_unit_safe(p)]
    return watched, [p for p in files if not is_unit_safe(p)]


def render(params: UnitParams) -> dict[str, str]:
    """The unit files, by name: the repair units (or the `run` service), then the doctor units
    when a textfile is asked for."""
    units = _render_repair(params)
    if params.textfile:
        units.update(render_doctor(params))
    return units


def render_doctor(params: UnitParams) -> dict[str, str]:
    """spegel-node-doctor.service (doctor --textfile, read-only but the textfile's dir) and its
    timer (every minute)."""
    textfile = unit_path(str(params.textfile), "--textfile")
    directory = posixpath.dirname(textfile)
    if not textfile.endswith(".prom") or directory in ("", "/"):
        raise BadInput(
            f"--textfile {textfile!r}: use a *.prom file in node_exporter's textfile directory "
            "(e.g. /var/lib/node_exporter/textfile/spegel_node.prom)"
        )
    service = DOCTOR_SERVICE_TEMPLATE.format(
        exec_start=params.doctor_exec_start,
        read_write_paths=f"-{directory}",
        hardening=HARDENING,
    )
    bodies = {DOCTOR_SERVICE: service, DOCTOR_TIMER: DOCTOR_TIMER_TEMPLATE}
    return {
        name: _HEADER.format(hosts_dir=params.hosts_dir, name=name) + body
        for name, body in bodies.items()
    }


def _render_repair(params: UnitParams) -> dict[str, str]:
    unit_path(params.exec_path, "--exec")
    unit_path(params.hosts_dir, "hosts dir")
    if params.config:
        unit_path(params.config, "--config")
    rw = [f"-{params.hosts_dir}", STATE_DIR]  # "-": a missing hosts dir is apply's to report
    service = SERVICE_TEMPLATE.format(
        exec_start=params.exec_start, read_write_paths=" ".join(rw), hardening=HARDENING
    )
    if params.mode == "service":
        body = _run_service(service)
        return {RUN_SERVICE: _HEADER.format(hosts_dir=params.hosts_dir, name=RUN_SERVICE) + body}
    path = PATH_TEMPLATE.format(path_changed="\n".join(f"PathChanged={p}" for p in params.watch))
    bodies = {SERVICE: service, TIMER: TIMER_TEMPLATE, PATH: path}
    return {
        name: _HEADER.format(hosts_dir=params.hosts_dir, name=name) + body
        for name, body in bodies.items()
    }


def _run_service(oneshot: str) -> str:
    """The repair service's hardening, as a Type=notify service running `run` for good."""
    text = oneshot.replace(
        "Description=spegel-node: keep the Spegel mirror first in containerd's hosts.toml",
        "Description=spegel-node run: keep the Spegel mirror first in containerd's hosts.toml",
    )
    text = text.replace(
        "# The timer and the path unit start it; their own limits bound how often.\n"
        "StartLimitIntervalSec=0\n",
        "StartLimitIntervalSec=5min\nStartLimitBurst=10\n",
    )
    text = text.replace(
        "Type=oneshot\n",
        "Type=notify\nNotifyAccess=main\nRestart=on-failure\nRestartSec=5s\n"
        "ExecReload=/bin/kill -HUP $MAINPID\n",
    )
    text = text.replace("TimeoutStartSec=2min\n", "TimeoutStartSec=2min\nTimeoutStopSec=15s\n")
    return text + "\n[Install]\nWantedBy=multi-user.target\n"


def default_exec() -> str:
    """The running spegel-node executable: the console script, else the one beside Python."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "spegel-node":
        found = argv0 if "/" in argv0 else shutil.which(argv0)
        if found:
            return os.path.abspath(found)
    beside = Path(sys.executable).parent / "spegel-node"
    if beside.is_file():
        return str(beside)
    on_path = shutil.which("spegel-node")
    if on_path:
        return os.path.abspath(on_path)
    raise BadInput("cannot tell where the spegel-node executable is; pass --exec PATH")


def _read_unit(dir_fd: int, name: str) -> bytes | None:
    try:
        return fsutil.read_at(dir_fd, name)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR):
            return None  # a symlink (or odd entry) is replaced by a regular file
        raise


def plan_units(unit_dir: Path, display: str, rendered: dict[str, str]) -> list[FileChange]:
    """Each unit file as it is in `unit_dir` (absent when the dir does not exist) and should be."""
    before: dict[str, bytes | None] = dict.fromkeys(rendered)
    try:
        with fsutil.open_dir(unit_dir) as fd:
            before = {name: _read_unit(fd, name) for name in rendered}
    except FileNotFoundError:
        pass  # written from scratch (the dir is created)
    except OSError as e:
        raise fsutil.refuse_os_error(e, f"read the units in {display}") from e
    shown = display.rstrip("/")
    return [
        FileChange(f"{shown}/{name}", before[name], text.encode())
        for name, text in rendered.items()
    ]


def write_units(unit_dir: Path, display: str, files: Sequence[FileChange]) -> None:
    """Write the changed files atomically (temp + fsync + rename), 0644; others are not touched.
    A unit someone changed since it was read is left alone and named (run again)."""
    if not any(f.changed for f in files):
        return
    try:
        unit_dir.mkdir(mode=fsutil.DIR_MODE, parents=True, exist_ok=True)
        with fsutil.open_dir(unit_dir) as fd:
            for f in files:
                name = posixpath.basename(f.path)
                if f.changed and not fsutil.replace_at(
                    fd, name, f.before, f.after, mode=UNIT_MODE, replace_link=True
                ):
                    raise Refused(f"{f.path} changed while install-units ran; run it again")
    except OSError as e:
        raise fsutil.refuse_os_error(e, f"write the units into {display}") from e


def ensure_hosts_dir(node: Node, hosts_dir: str) -> bool:
    """Create the hosts dir (0755) if missing: the service may write only inside it."""
    path = node.real_path(hosts_dir)
    if path.is_dir():
        return False
    try:
        path.mkdir(mode=fsutil.DIR_MODE, parents=True)
        path.chmod(fsutil.DIR_MODE)
    except FileExistsError:
        return False
    except OSError as e:
        raise fsutil.refuse_os_error(e, f"create hosts dir {hosts_dir}") from e
    return True


@dataclass(frozen=True)
class Installed:
    unit_dir: str  # as reported: a node path, or the --unit-dir given
    files: tuple[FileChange, ...]
    params: UnitParams
    dry_run: bool
    created_hosts_dir: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def changed(self) -> list[str]:
        return [posixpath.basename(f.path) for f in self.files if f.changed]

    def to_json(self) -> dict[str, object]:
        return {
            "unit_dir": self.unit_dir,
            "changed": self.changed,
            "units": {posixpath.basename(f.path): (f.after or b"").decode() for f in self.files},
            "dry_run": self.dry_run,
            "exec": self.params.exec_path,
            "hosts_dir": self.params.hosts_dir,
            "watch": list(self.params.watch),
            "created_hosts_dir": self.created_hosts_dir,
            "warnings": list(self.warnings),
            "textfile": self.params.textfile,
        }

    @property
    def enable_hint(self) -> str:
        return enable_hint(self.params)


# daemon-reload alone makes a running path unit watch a changed list (seen on systemd 252).
ENABLE_HINT = f"systemctl daemon-reload && systemctl enable --now {TIMER} {PATH}"


def enable_hint(params: UnitParams) -> str:
    """The systemctl line for the units `params` renders (with --textfile, the doctor timer)."""
    if not params.textfile:
        return ENABLE_HINT
    units = [RUN_SERVICE] if params.mode == "service" else [TIMER, PATH]
    return "systemctl daemon-reload && systemctl enable --now " + " ".join([*units, DOCTOR_TIMER])


def install_units(
    node: Node,
    hosts_dir: str,
    registries: Sequence[Registry],
    *,
    exec_path: str | None = None,
    unit_dir: Path | None = None,
    config: str | None = None,
    distro_owned: str | None = None,
    dry_run: bool = False,
    mode: str = "timer",
    textfile: str | None = None,
) -> Installed:
    """Render the units for this node and write those that changed (nothing with `dry_run`).

    `unit_dir` is used as given; by default it is /etc/systemd/system under the node's root.
    `distro_owned` names a flavor whose hosts dir the agent must not write (refused: exit 1).
    """
    if distro_owned:
        raise Refused(
            f"{distro_owned} owns its hosts dir and apply refuses to write it, so there is "
            "nothing for the units to run; run `spegel-node apply` to see what to set instead"
        )
    warnings: list[str] = []
    if exec_path is None:
        exec_path = default_exec()
        if not node.is_live:
            warnings.append(
                f"--exec not given: using this process's {exec_path}, which may not exist on "
                f"the node under {node.root}"
            )
    unit_path(exec_path, "--exec")
    if not node.path(exec_path).exists():
        warnings.append(f"{exec_path} does not exist on the node; the service will fail to start")
    hosts_dir = unit_path(hosts_dir, "hosts dir")
    snapshot = hostsdir.scan(node.real_path(hosts_dir), hosts_dir)
    watched, skipped = watch_paths(hosts_dir, registries, snapshot)
    warnings += [
        f"not watching {p}: systemd cannot take that path literally (the timer still repairs it)"
        for p in skipped
    ]
    params = UnitParams(
        exec_path=exec_path,
        hosts_dir=hosts_dir,
        watch=tuple(watched),
        config=config,
        mode=mode,
        textfile=textfile,
    )
    if textfile and not node.path(posixpath.dirname(textfile)).is_dir():
        warnings.append(
            f"{posixpath.dirname(textfile)} does not exist on the node: create node_exporter's "
            "textfile directory (--collector.textfile.directory) or doctor exits 2"
        )
    target = unit_dir if unit_dir is not None else node.path(DEFAULT_UNIT_DIR)
    display = str(unit_dir) if unit_dir is not None else DEFAULT_UNIT_DIR
    files = tuple(plan_units(target, display, render(params)))
    created = False
    if not dry_run:
        write_units(target, display, files)
        created = ensure_hosts_dir(node, hosts_dir)
    return Installed(display, files, params, dry_run, created, tuple(warnings))


def install_report(result: Installed, output: str) -> None:
    from spegel_node.output import print_json, print_lines

    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if output == "json":
        print_json(result.to_json())
        return
    verb = "would " if result.dry_run else ""
    lines = [f"{verb}{f.action} {f.path}" for f in result.files if f.changed]
    if result.created_hosts_dir:
        lines.append(f"created hosts dir {result.params.hosts_dir}")
    print_lines(lines)
    if result.dry_run:
        for f in result.files:
            if f.changed:
                sys.stdout.write(f.diff())
    n = len(result.changed)
    done = "to change" if result.dry_run else "changed"
    print(f"{n} unit file{'s' if n != 1 else ''} {done}" if n else "units up to date")
    print(f"watching {result.params.hosts_dir} and {len(result.params.watch) - 1} hosts.toml files")
    if n:
        print(f"this command does not run systemctl; next: {result.enable_hint}")

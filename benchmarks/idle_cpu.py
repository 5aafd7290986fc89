"""Idle CPU seconds per day: `spegel-node run` against the timer + path pair.

    PYTHONPATH=src .venv/bin/python benchmarks/idle_cpu.py [--window 60] [--bin .venv/bin]

An idle node: the hosts dir already applied, nobody writing to it, Spegel's /v2/ answering (a
local server, so the gate probes for real). Both on the same fake node tree under --root:

- `run` (gate on, the default probe_interval 10s, and 5s as its own row): the process's own CPU
  time (user + system, all threads: the CLOCK_PROCESS_CPUTIME_ID it logs on its ready and stop
  lines, checked against /proc/PID/stat) from ready to stop, scaled to 86 400 s. Again with
  `--textfile` (doctor once a minute) over 119 s (two doctor runs: one a minute).
- timer + path: the timer starts `apply` every minute (systemd/spegel-node-repair.timer), so
  1 440 runs a day, each one process from exec to exit (its CPU time from wait4, the median of
  --runs). The path unit starts `apply` only when something under the hosts dir changes; on an
  idle node that is what apply itself writes, so the wakeups counted are the timer runs that
  changed anything in the hosts dir (mtimes compared before and after; 0 on a healthy node).
  systemd's own work to start a unit is not counted (it is not ours; it would add to the pair).

Prints one row each; never fails on the figures (exit 1 when a command fails).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.v2stub import v2_server  # noqa: E402

HOSTS = "etc/containerd/certs.d"
DAY_S = 86400.0
TIMER_RUNS_PER_DAY = 1440  # OnUnitActiveSec=1min
GOAL_RUN_S = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
REGISTRIES = ["https://docker.io", "https://ghcr.io", "https://quay.io", "https://gcr.io"]


def make_node(base: Path, port: int, probe_interval: str = "") -> Path:
    root = base / f"node{probe_interval}"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/{HOSTS}"\n'
    )
    (root / "etc/spegel-node").mkdir(parents=True)
    regs = ", ".join(f'"{r}"' for r in REGISTRIES)
    (root / "etc/spegel-node/config.toml").write_text(
        f'registries = [{regs}]\nnode_ip = "127.0.0.1"\nhost_port = {port}\n'
        + (f'probe_interval = "{probe_interval}"\n' if probe_interval else "")
    )
    return root


def cpu_seconds(pid: int) -> float:
    """utime + stime of a running process (its threads included), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def env() -> dict[str, str]:
    e = dict(os.environ, TERM="dumb")
    for name in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "PYTHONDONTWRITEBYTECODE"):
        e.pop(name, None)
    return e


@dataclass
class Row:
    what: str
    per_day_s: float
    how: str

    def line(self) -> str:
        return f"{self.what:<44} {self.per_day_s:8.1f} CPU-s/day   {self.how}"


def logged_cpu(line: str) -> float:
    return float(line.split("cpu_s=", 1)[1].split()[0])


def idle_run(exe: str, root: Path, window_s: float, *extra: str) -> tuple[float, float, int]:
    """`run`'s CPU seconds from its ready line to its stop line (the process-wide CPU clock it
    logs, threads included), the wall seconds between them, and the change applies it made.
    /proc/PID/stat (10 ms ticks) must agree, within two ticks."""
    ready = root.parent / "ready"
    ready.unlink(missing_ok=True)
    log = root.parent / "run.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [exe, "run", "--root", str(root), "--ready-file", str(ready), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env(),
        )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"run did not become ready:\n{log.read_text()[-2000:]}")
            time.sleep(0.01)
        started = time.monotonic()
        ticks_before = cpu_seconds(proc.pid)
        time.sleep(window_s)
        ticks = cpu_seconds(proc.pid) - ticks_before
        wall = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    lines = log.read_text().splitlines()
    ready_line = next(line for line in lines if "event=ready" in line)
    stop_line = next(line for line in lines if "event=stop" in line)
    cpu = logged_cpu(stop_line) - logged_cpu(ready_line)
    if abs(cpu - ticks) > 2.5 / CLK_TCK + 0.01:  # the stop itself and the ready line's lag
        raise RuntimeError(f"logged CPU {cpu:.3f} s and /proc's {ticks:.3f} s disagree")
    changes = sum("reason=change" in line for line in lines)
    return cpu, wall, changes


def mtimes(root: Path) -> dict[str, int]:
    hosts = root / HOSTS
    return {str(p): p.lstat().st_mtime_ns for p in [hosts, *sorted(hosts.rglob("*"))]}


def apply_cpu(exe: str, root: Path) -> float:
    """One `apply` process's CPU time (user + system, from wait4), exec to exit."""
    pid = os.posix_spawn(
        exe,
        [exe, "apply", "--root", str(root)],
        env(),
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
        ],
    )
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"apply exited {os.waitstatus_to_exitcode(status)}")
    return usage.ru_utime + usage.ru_stime


def measure(bin_dir: Path, window_s: float, runs: int) -> list[Row]:
    exe = str(bin_dir / "spegel-node")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="spegel-node-idle-") as tmp, v2_server() as port:
        roots = {}
        for interval in ("", "5s"):
            root = roots[interval] = make_node(Path(tmp), port, interval)
            apply_cpu(exe, root)  # the first apply creates the files
            cpu, wall, changes = idle_run(exe, root, window_s)
            rows.append(
                Row(
                    f"run, idle (probe_interval {interval or '10s, the default'})",
                    cpu * DAY_S / wall,
                    f"{cpu * 1000:.0f} ms CPU over {wall:.0f} s, {changes} change applies",
                )
            )
        root = roots[""]
        prom_dir = Path(tmp) / "textfile"
        prom_dir.mkdir()
        prom = str(prom_dir / "spegel_node.prom")
        cpu, wall, _ = idle_run(exe, root, 119.0, "--textfile", prom)
        rows.append(
            Row(
                "run --textfile, idle (doctor once a minute)",
                cpu * DAY_S / wall,
                f"{cpu * 1000:.0f} ms CPU over {wall:.0f} s",
            )
        )
        samples, wakeups = [], 0
        for _ in range(runs):
            before = mtimes(root)
            samples.append(apply_cpu(exe, root))
            wakeups += mtimes(root) != before
        per_run = statistics.median(samples)
        path_per_day = wakeups / runs * TIMER_RUNS_PER_DAY  # each such run wakes the path unit
        rows.append(
            Row(
                "timer + path pair, idle (apply every minute)",
                per_run * (TIMER_RUNS_PER_DAY + path_per_day),
                f"{per_run * 1000:.0f} ms CPU per apply x {TIMER_RUNS_PER_DAY} timer runs"
                f" + {path_per_day:.0f} path wakeups ({wakeups}/{runs} applies wrote)",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=60.0, help="idle seconds measured")
    parser.add_argument("--runs", type=int, default=15, help="apply runs (median CPU)")
    parser.add_argument("--bin", type=Path, default=REPO / ".venv/bin")
    args = parser.parse_args(argv)
    try:
        rows = measure(args.bin, args.window, args.runs)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"idle CPU benchmark failed: {e}", file=sys.stderr)
        return 1
    for row in rows:
        print(row.line())
    verdict = "within" if rows[0].per_day_s <= GOAL_RUN_S else "OVER"
    print(f"goal for run: under {GOAL_RUN_S:.0f} CPU-s/day: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

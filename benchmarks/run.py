"""spegel-node benchmarks: wall time and peak RSS of the real console script, as medians.

    make bench                                      # .venv/bin/python benchmarks/run.py
    .venv/bin/python benchmarks/run.py --p2p-only   # only the p2p cluster figures (p2p_bench.py)
    .venv/bin/python benchmarks/run.py --runs 5     # quicker, noisier
    .venv/bin/python benchmarks/run.py --rev HEAD~1 # a commit instead of the work tree
    .venv/bin/python benchmarks/run.py --no-dev     # skip the dev-venv comparison

Every command runs as a subprocess of the `spegel-node` console script of a CLEAN venv: one with
only the project and its runtime dependencies (`pip install <repo>`, no [dev] extras), as the
Ansible role installs it on a node. The venv is built once per dependency list and cached (see
--cache); the project is reinstalled into it whenever src/ or pyproject.toml changed. The dev
venv (.venv: editable, with the dev tools) is measured for comparison on a few commands.

Each figure is the median over --runs runs, next to a baseline measured in the same invocation,
interleaved run by run with it (a loaded machine slows both alike): `python -c pass` for
`--version`, and `spegel-node --version` (start-up alone) for the commands that do work. apply
runs on fake node trees under --root (--no-gate, or gating on a local /v2/ server), so the time
is the agent's own work, plus once on this machine's own / with --dry-run (the process scan and
node_ip "auto" a real node pays). doctor runs on the sandbox node: a real containerd and a real
registry standing in for Spegel on loopback (tests/support/sandbox.py), healthy, stopped
(connection refused) and hung (HangingServer: accepts, never answers). Peak RSS is each
command's ru_maxrss (os.wait4 in a small launcher, see LAUNCHER).

Benchmarks print figures; they do not pass or fail on them. The script exits non-zero when a
command it runs fails (an unexpected exit code or output).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import idle_cpu  # noqa: E402
import p2p_bench  # noqa: E402
from support import fake_nodes  # noqa: E402
from support.sandbox import HangingServer, Sandbox, missing_binaries  # noqa: E402
from support.v2stub import v2_server  # noqa: E402

HOSTS_DIR = "/etc/containerd/certs.d"
BUDGETS = {
    "version": ("--version", 0.150),
    "apply_200": ("no-op apply, 200 registries", 0.400),
    "doctor_healthy": ("doctor, healthy node", 0.700),
    "doctor_hung": ("doctor, Spegel hung", 3.5),
    "doctor_many_5000": ("doctor, 5,000 registries", 2.5),  # doctor's own bound is 5 s
}
RSS_BUDGET_MB = 60.0


class BenchError(RuntimeError):
    """A command the benchmark runs failed."""


# ---------------------------------------------------------------- running one command


@dataclass
class Sample:
    wall_s: float
    maxrss_kb: int


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(s.wall_s for s in self.samples)

    @property
    def rss_mb(self) -> float:
        return max(s.maxrss_kb for s in self.samples) / 1024


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # This workplace sets PYTHONDONTWRITEBYTECODE; real nodes do not. Without it the dev venv's
    # editable src/ keeps its .pyc files like any install (the clean venv has them from pip).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["TERM"] = "dumb"
    return env


# The commands run under this small launcher, which times them and reads their peak RSS. Linux
# keeps a process's peak RSS across exec, and a child forked (or vforked) from this benchmark
# would start with the benchmark's own RSS as its peak: spawned from the launcher (a bare
# `python -S`, about 9 MB), a command's peak is its own, above a floor of the launcher's size.
LAUNCHER = """
import os, sys, time
out, err, *argv = sys.argv[1:]
actions = [
    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_TRUNC, 0),
    (os.POSIX_SPAWN_OPEN, 2, err, os.O_WRONLY | os.O_TRUNC, 0),
]
started = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
print(wall, os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def run_once(argv: Sequence[str], expect: Sequence[int] = (0,), check: str = "") -> Sample:
    """Run argv (an absolute path first) under the launcher; BenchError on an unexpected result."""
    with tempfile.TemporaryDirectory(prefix="spegel-node-bench-out-") as d:
        out, err = Path(d, "out"), Path(d, "err")
        out.touch()
        err.touch()
        base = getattr(sys, "_base_executable", sys.executable)
        done = subprocess.run(
            [base, "-S", "-I", "-c", LAUNCHER, str(out), str(err), *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=child_env(),
            check=False,
        )
        stdout = out.read_text("utf-8", "replace")
        stderr = err.read_text("utf-8", "replace")
    if done.returncode != 0:
        raise BenchError(f"the launcher failed for {' '.join(argv)}:\n{done.stderr[-3000:]}")
    wall, code, maxrss = done.stdout.split()
    if int(code) not in expect or (check and check not in stdout):
        raise BenchError(
            f"{' '.join(argv)}: exit {code} (expected {list(expect)})"
            + (f", output lacks {check!r}" if check and check not in stdout else "")
            + f"\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}"
        )
    return Sample(float(wall), int(maxrss))


@dataclass
class Cmd:
    argv: list[str]
    expect: tuple[int, ...] = (0,)
    check: str = ""  # text the output must contain (checked every run)
    before: Callable[[], None] | None = None  # untimed setup before every run

    def run(self) -> Sample:
        if self.before is not None:
            self.before()
        return run_once(self.argv, self.expect, self.check)


def measure(cmds: Sequence[Cmd], runs: int) -> list[Series]:
    """Interleave the commands run by run (one warm-up each first, not counted)."""
    for cmd in cmds:
        cmd.run()
    series = [Series() for _ in cmds]
    for _ in range(runs):
        for cmd, s in zip(cmds, series, strict=True):
            s.samples.append(cmd.run())
    return series


# ---------------------------------------------------------------- venvs


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for base in paths:
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]
        for p in files:
            if "__pycache__" in p.parts:
                continue
            h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _pip(venv: Path, *args: str) -> None:
    done = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(
            f"pip {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )


def project_source(rev: str | None, tmp: Path) -> tuple[Path, str]:
    """The project to install: the work tree, or commit `rev` exported to `tmp`; and its key."""
    if rev is None:
        return REPO, "tree-" + _digest([REPO / "pyproject.toml", REPO / "src"])
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    src = tmp / f"src-{commit[:12]}"
    src.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "pyproject.toml", "README.md", "src"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src, "commit-" + commit


def clean_venv(cache: Path, source: Path, key: str) -> Path:
    """A venv with the project and its runtime dependencies only: the dependencies installed
    once per dependency list, the project reinstalled when `key` (its source) changes."""
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    deps = json.dumps([sys.version, project.get("dependencies", [])]).encode()
    venv = cache / f"venv-{hashlib.sha256(deps).hexdigest()[:16]}"
    if not (venv / ".deps-done").exists():
        print(f"building the clean venv {venv} (once per dependency list) ...", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        _pip(venv, "install", "-q", str(source))
        (venv / ".deps-done").write_text("")
    stamp = venv / ".installed"
    if not stamp.exists() or stamp.read_text() != key:
        print(f"installing the project into the clean venv ({key}) ...", flush=True)
        _pip(venv, "install", "-q", "--no-deps", "--force-reinstall", str(source))
        stamp.write_text(key)
    return venv


def runtime_packages(venv: Path) -> str:
    done = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=False,
    )
    skip = ("pip==", "setuptools==", "spegel-node==")
    return ", ".join(line for line in done.stdout.split() if not line.startswith(skip))


# ---------------------------------------------------------------- node trees


def registries(n: int) -> list[str]:
    return [f"https://registry-{i:03d}.example.com" for i in range(n)]


def make_node(base: Path, n: int, *, node_ip: str | None = None, host_port: int = 29999) -> Path:
    """A kubeadm + containerd node (config_path set) with a config naming n registries;
    node_ip unset means "auto", the default (this machine's primary IPv4, via psutil)."""
    root = base / f"node-{n}-{host_port}"
    fake_nodes.make_containerd(root, config_path=HOSTS_DIR)
    fake_nodes.write(root, "/etc/spegel-node/config.toml", config_text(n, node_ip, host_port))
    return root


def config_text(n: int, node_ip: str | None = None, host_port: int = 29999) -> str:
    regs = ", ".join(f'"{r}"' for r in registries(n))
    ip = f'node_ip = "{node_ip}"\n' if node_ip else ""
    return f"{ip}host_port = {host_port}\nregistries = [{regs}]\n"


def distro_file(registry: str) -> str:
    """A hosts.toml as a distro or a person writes it, without Spegel."""
    host = registry.removeprefix("https://")
    return (
        f"# written by the node's provisioning\n"
        f'server = "{registry}"\n\n'
        f'[host."https://mirror.{host}"]\n'
        f'  capabilities = ["pull", "resolve"]\n'
        f"  skip_verify = false\n"
    )


def seed_distro_files(root: Path, n: int) -> None:
    for r in registries(n):
        fake_nodes.write(
            root, f"{HOSTS_DIR}/{r.removeprefix('https://')}/hosts.toml", distro_file(r)
        )


# ---------------------------------------------------------------- a /v2/ server for the gate


# ---------------------------------------------------------------- the report


@dataclass
class Row:
    key: str
    what: str
    series: Series
    baseline: str
    base: Series

    def line(self) -> str:
        m, b = self.series.median_s, self.base.median_s
        return (
            f"{self.what:<48} {m * 1000:8.0f} ms   {self.baseline:<26} {b * 1000:6.0f} ms"
            f"   +{(m - b) * 1000:6.0f} ms   {self.series.rss_mb:5.1f} MB"
        )


HEADER = (
    f"{'command':<48} {'median':>11}   {'baseline':<26} {'median':>9}   {'over it':>9}   "
    f"{'peak RSS':>8}"
)


def machine() -> list[str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return [
        f"machine: {len(os.sched_getaffinity(0))} CPUs (nproc), {model}, "
        f"{platform.system()} {platform.release()}",
        f"python: {platform.python_version()} ({getattr(sys, '_base_executable', sys.executable)})",
        "load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
    ]


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


# ---------------------------------------------------------------- the scenarios


def bench_version(bin_dir: Path, runs: int, label: str) -> Row:
    version, base = measure(
        [
            Cmd([str(bin_dir / "spegel-node"), "--version"], check="spegel-node "),
            Cmd([str(bin_dir / "python"), "-c", "pass"]),
        ],
        runs * 2,
    )
    key = "version" if label == "clean" else f"version_{label}"
    return Row(key, f"spegel-node --version ({label})", version, "python -c pass", base)


def bench_completion(bin_dir: Path, runs: int) -> Row:
    """The completion script costs its own command only: typer's completion code is imported
    inside `completion`, so every other command's start-up is the --version row's."""
    script, base = measure(
        [
            Cmd(
                [str(bin_dir / "spegel-node"), "completion", "bash"],
                check="_spegel_node_completion",
            ),
            Cmd([str(bin_dir / "spegel-node"), "--version"]),
        ],
        runs,
    )
    return Row("completion", "spegel-node completion bash", script, "--version", base)


def bench_apply(
    bin_dir: Path, tmp: Path, runs: int, sizes: Sequence[int], label: str = ""
) -> list[Row]:
    exe = str(bin_dir / "spegel-node")
    version = Cmd([exe, "--version"])
    rows: list[Row] = []
    for n in sizes:
        root = make_node(tmp, n)
        argv = [exe, "apply", "--no-gate", "--root", str(root)]
        run_once(argv, check=f"{n} files changed")  # the first apply creates every file
        cmd = Cmd(argv, check="nothing to change")
        s, b = measure([cmd, version], runs)
        key = f"apply_{n}" + (f"_{label}" if label else "")
        what = f"apply, nothing to change, {n} registries" + (f" ({label})" if label else "")
        rows.append(Row(key, what, s, "--version", b))
        print(rows[-1].line(), flush=True)
    return rows


def bench_apply_repair(bin_dir: Path, tmp: Path, runs: int, n: int) -> Row:
    """Every hosts.toml rewritten without Spegel since the last apply (as k3s does at start)."""
    exe = str(bin_dir / "spegel-node")
    root = make_node(tmp / "repair", n)
    seed_distro_files(root, n)
    argv = [exe, "apply", "--no-gate", "--root", str(root)]
    run_once(argv, check=f"{n} files changed")
    cmd = Cmd(argv, check=f"{n} files changed", before=lambda: seed_distro_files(root, n))
    s, b = measure([cmd, Cmd([exe, "--version"])], runs)
    return Row("apply_repair", f"apply, repairing all {n} files", s, "--version", b)


def bench_apply_gate(bin_dir: Path, tmp: Path, runs: int, n: int) -> Row:
    exe = str(bin_dir / "spegel-node")
    with v2_server() as port:
        root = make_node(tmp / "gate", n, node_ip="127.0.0.1", host_port=port)
        argv = [exe, "apply", "--root", str(root)]
        run_once(argv, check=f"{n} files changed")
        cmd = Cmd(argv, check="HTTP 200; mirror advertised")
        s, b = measure([cmd, Cmd([exe, "--version"])], runs)
    return Row("apply_gate", f"apply, nothing to change, {n} reg., gate on", s, "--version", b)


def bench_apply_live(bin_dir: Path, tmp: Path, runs: int, n: int) -> Row:
    """apply on this machine's own / as on a node: the running processes are scanned for
    containerd (psutil) and node_ip "auto" is resolved. --dry-run (writes nothing, takes no
    lock), the config and the hosts dir (prepared by an apply under a fake root) given by flag."""
    exe = str(bin_dir / "spegel-node")
    prepared = make_node(tmp / "live", n)
    run_once([exe, "apply", "--no-gate", "--root", str(prepared)], check=f"{n} files changed")
    config = tmp / "live" / "config.toml"
    config.write_text(config_text(n))
    argv = [exe, "apply", "--dry-run", "--no-gate", "--config", str(config)]
    argv += ["--hosts-dir", str(prepared / HOSTS_DIR.lstrip("/"))]
    s, b = measure([Cmd(argv, check="nothing to change"), Cmd([exe, "--version"])], runs)
    return Row("apply_live", f"apply --dry-run on / (live), {n} registries", s, "--version", b)


def bench_validate(bin_dir: Path, tmp: Path, runs: int, n: int) -> Row:
    exe = str(bin_dir / "spegel-node")
    root = make_node(tmp / "validate", n)
    run_once([exe, "apply", "--no-gate", "--root", str(root)])
    cmd = Cmd([exe, "validate", "--root", str(root)], check=f"{n} files checked: 0 error(s)")
    s, b = measure([cmd, Cmd([exe, "--version"])], runs)
    return Row("validate", f"validate, hosts dir of {n} registries", s, "--version", b)


def sandbox_root(sandbox: Sandbox, base: Path) -> Path:
    """A node root for the sandbox, as tests/test_doctor_sandbox.py builds it: containerd's
    socket and config are symlinks to the sandbox's. The hosts dir at the node path containerd's
    config_path names is a real directory here (apply writes there; doctor reads it)."""
    root = base / "sandbox-node"
    links = {
        "/run/containerd/containerd.sock": sandbox.containerd.socket,
        str(sandbox.containerd.socket): sandbox.containerd.socket,
        "/etc/containerd/config.toml": sandbox.containerd.config_path,
    }
    for node_path, target in links.items():
        link = root / node_path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    fake_nodes.mkdir(root, str(sandbox.hosts_dir))
    fake_nodes.write(
        root,
        "/etc/spegel-node/config.toml",
        f'node_ip = "127.0.0.1"\nhost_port = {sandbox.spegel.port}\n'
        f'registries = ["{sandbox.upstream.url}"]\n',
    )
    return root


def bench_doctor_many(bin_dir: Path, tmp: Path, runs: int, n: int) -> Row:
    """doctor on a fake tree with n registries (one hosts.<registry> check each): how it grows.
    No containerd answers there and nothing listens on the mirror port, so it exits 1."""
    exe = str(bin_dir / "spegel-node")
    root = make_node(tmp / "doctor-many", n, node_ip="127.0.0.1")
    run_once([exe, "apply", "--no-gate", "--root", str(root)])
    cmd = Cmd([exe, "doctor", "--root", str(root)], (1,), " checks in ")
    s, b = measure([cmd, Cmd([exe, "--version"])], runs)
    key = "doctor_many" if n == 200 else f"doctor_many_{n}"
    return Row(key, f"doctor, fake node (no daemons), {n} registries", s, "--version", b)


def bench_doctor(bin_dirs: dict[str, Path], tmp: Path, runs: int) -> list[Row]:
    missing = missing_binaries()
    if missing:
        print(f"doctor: skipped, the sandbox needs {', '.join(missing)} (make bench installs them)")
        return []
    rows: list[Row] = []
    clean = bin_dirs["clean"]
    with Sandbox() as sandbox:
        root = sandbox_root(sandbox, tmp)
        run_once([str(clean / "spegel-node"), "apply", "--no-gate", "--root", str(root)])

        def doctor(bin_dir: Path, expect: int, check: str) -> Cmd:
            argv = [str(bin_dir / "spegel-node"), "doctor", "--root", str(root)]
            return Cmd(argv, (expect,), check)

        def version(bin_dir: Path) -> Cmd:
            return Cmd([str(bin_dir / "spegel-node"), "--version"])

        for label, bin_dir in bin_dirs.items():
            s, b = measure([doctor(bin_dir, 0, "answered HTTP 200"), version(bin_dir)], runs)
            key = "doctor_healthy" if label == "clean" else f"doctor_healthy_{label}"
            suffix = "" if label == "clean" else f" ({label})"
            rows.append(Row(key, f"doctor, healthy sandbox node{suffix}", s, "--version", b))
            print(rows[-1].line(), flush=True)
        sandbox.spegel.stop()
        s, b = measure([doctor(clean, 1, "connection refused"), version(clean)], runs)
        rows.append(Row("doctor_down", "doctor, Spegel down (refused)", s, "--version", b))
        print(rows[-1].line(), flush=True)
        with HangingServer(sandbox.spegel.port):
            hung_runs = max(3, runs // 3)
            s, b = measure([doctor(clean, 1, "Spegel is hung"), version(clean)], hung_runs)
        rows.append(Row("doctor_hung", "doctor, Spegel hung (accepts, silent)", s, "--version", b))
        print(rows[-1].line(), flush=True)
    return rows


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per figure (median)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "spegel-node-bench",
        help="where the clean venv is kept",
    )
    parser.add_argument("--no-dev", action="store_true", help="skip the dev-venv comparison")
    parser.add_argument("--no-p2p", action="store_true", help="skip the p2p cluster figures")
    parser.add_argument(
        "--p2p-only", action="store_true", help="only the p2p cluster figures (p2p_bench.py)"
    )
    p2p_bench.add_arguments(parser, prefix="p2p-")
    parser.add_argument(
        "--idle-window", type=float, default=60.0, help="idle seconds `run` is measured over"
    )
    parser.add_argument(
        "--rev",
        help="measure this commit (git archive) instead of the work tree, e.g. HEAD or HEAD~1",
    )
    args = parser.parse_args(argv)
    if args.p2p_only:
        return p2p_section(args)
    started = time.monotonic()
    for line in machine():
        print(line)
    dev = REPO / ".venv/bin"
    if args.rev is not None:
        args.no_dev = True  # the dev venv runs the work tree (editable)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="spegel-node-bench-") as tmp_name:
        tmp = Path(tmp_name)
        source, key = project_source(args.rev, tmp)
        clean = clean_venv(args.cache, source, key) / "bin"
        print(f"measuring: {key}")
        print(f"clean venv: {clean.parent} ({runtime_packages(clean.parent)})")
        bin_dirs = {"clean": clean}
        if not args.no_dev and (dev / "spegel-node").exists():
            bin_dirs["dev venv"] = dev
        code = run_all(args, bin_dirs, tmp, rows)
    if code:
        return code
    summary(rows)
    if not args.no_p2p:
        code = p2p_section(args)
        if code:
            return code
    print(
        f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"benchmark took {time.monotonic() - started:.0f} s"
    )
    return 0


def run_all(args: argparse.Namespace, bin_dirs: dict[str, Path], tmp: Path, rows: list[Row]) -> int:
    clean = bin_dirs["clean"]
    print(
        f"medians of {args.runs} runs (Spegel hung: {max(3, args.runs // 3)}), interleaved with "
        "the baseline; 'over it' = median - baseline median"
    )
    try:
        section("start-up")
        print(HEADER)
        for label, bin_dir in bin_dirs.items():
            rows.append(bench_version(bin_dir, args.runs, label))
            print(rows[-1].line(), flush=True)
        rows.append(bench_completion(clean, args.runs))
        print(rows[-1].line(), flush=True)
        section("apply (fake node trees under --root)")
        print(HEADER)
        rows += bench_apply(clean, tmp, args.runs, (5, 50, 200, 500))
        if "dev venv" in bin_dirs:
            rows += bench_apply(bin_dirs["dev venv"], tmp / "dev", args.runs, (200,), "dev")
        rows.append(bench_apply_repair(clean, tmp, args.runs, 200))
        print(rows[-1].line(), flush=True)
        rows.append(bench_apply_gate(clean, tmp, args.runs, 200))
        print(rows[-1].line(), flush=True)
        try:
            rows.append(bench_apply_live(clean, tmp, args.runs, 200))
            print(rows[-1].line(), flush=True)
        except BenchError as e:  # depends on this machine (a k3s host refuses, for one)
            print(f"apply on / (live): skipped, {str(e).splitlines()[0]}")
        section("validate")
        print(HEADER)
        rows.append(bench_validate(clean, tmp, args.runs, 500))
        print(rows[-1].line(), flush=True)
        section("doctor (sandbox: real containerd, a real registry as Spegel)")
        print(HEADER)
        rows += bench_doctor(bin_dirs, tmp, args.runs)
        for n in (200, 5000):  # 5,000: issue 11 measured 10.8 s and false failures
            rows.append(
                bench_doctor_many(clean, tmp, max(3, args.runs // 3) if n > 200 else args.runs, n)
            )
            print(rows[-1].line(), flush=True)
        section("idle CPU per day: run vs the timer + path pair (benchmarks/idle_cpu.py)")
        try:
            idle = idle_cpu.measure(clean, args.idle_window, args.runs)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            raise BenchError(f"idle CPU: {e}") from e
        for row in idle:
            print(row.line(), flush=True)
        verdict = "within" if idle[0].per_day_s <= idle_cpu.GOAL_RUN_S else "OVER"
        print(f"goal for run: under {idle_cpu.GOAL_RUN_S:.0f} CPU-s/day: {verdict}")
    except BenchError as e:
        print(f"\nbenchmark failed: {e}", file=sys.stderr)
        return 1
    return 0


def p2p_section(args: argparse.Namespace) -> int:
    """The p2p figures (benchmarks/p2p_bench.py): three netns nodes, real Spegel, 1.6.20."""
    section("p2p (three netns nodes: containerd 2.3.7, Spegel 0.7.3; one 1.6.20 sandbox node)")
    p2p_args = argparse.Namespace(**vars(args))
    p2p_args.runs = args.p2p_runs
    try:
        return p2p_bench.run(p2p_args)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"\np2p benchmark failed: {e}", file=sys.stderr)
        return 1


def summary(rows: Sequence[Row]) -> None:
    by_key = {r.key: r for r in rows}
    section("budgets (clean venv, medians)")
    for key, (what, budget) in BUDGETS.items():
        row = by_key.get(key)
        if row is None:
            print(f"{what:<34} not measured")
            continue
        m = row.series.median_s
        verdict = "within" if m <= budget else "OVER"
        print(f"{what:<34} {m * 1000:6.0f} ms   budget {budget * 1000:5.0f} ms   {verdict}")
    peaks = [
        r.series.rss_mb
        for r in rows
        if r.key.startswith(("apply", "doctor", "validate")) and "dev" not in r.key
    ]
    if peaks:
        peak = max(peaks)
        verdict = "within" if peak <= RSS_BUDGET_MB else "OVER"
        print(
            f"{'peak RSS (apply, validate, doctor)':<34} {peak:6.1f} MB   budget "
            f"{RSS_BUDGET_MB:5.0f} MB   {verdict}"
        )


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""`make demo`: spegel-node on a sandbox node, with real containerd and real registries.

It starts a sandbox on loopback (a containerd daemon with its own root, state and socket; an
"upstream" registry holding a tiny image; a second registry, a pull-through cache of upstream,
standing in for Spegel on its hostPort), then runs the real `spegel-node` console script against
it step by step and checks each outcome in the registries' access logs (containerd's requests
carry the user agent `containerd/<version>`).

Everything it starts is stopped and removed at the end, also on failure, Ctrl-C or SIGTERM.
Exit status: 0 when every expected outcome happened, 1 otherwise (so CI can run it).

To add a scenario, add a function `def step_xxx(demo: Demo) -> None` that calls
`demo.step(title)`, `demo.run("apply", ...)`, `demo.pull()` and `demo.expect(...)`, and list it
in STEPS.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.sandbox import (  # noqa: E402
    RegistryProc,
    Request,
    Sandbox,
    missing_binaries,
    wait_until,
)

from spegel_node.redact import redact_hosts_toml  # noqa: E402

STATE_DIR = Path("/var/lib/spegel-node")  # the agent's record, under --root /
CONFIG_NAME = "spegel-node.toml"
BLOBS_PER_PULL = 2  # the sandbox image: one config blob, one layer
COLOR = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _style(text: str, code: str) -> str:
    return f"\033[{code}m{text}\033[0m" if COLOR else text


def spegel_node_binary() -> str:
    """The venv's `spegel-node` console script (the one `pip install -e .` made)."""
    beside = Path(sys.executable).parent / "spegel-node"
    for candidate in (beside, REPO / ".venv/bin/spegel-node"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("spegel-node")
    if found is None:
        raise SystemExit(
            "demo: no spegel-node console script; run `make demo` (it builds .venv-demo)"
        )
    return found


@dataclass
class DoctorLine:
    """One check in `spegel-node doctor`'s plain output: `[✗] spegel.v2  summary`, then the
    indented details and remediation lines."""

    symbol: str
    summary: str
    more: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.symbol == "✗"

    @property
    def text(self) -> str:
        return "\n".join([self.summary, *self.more])


def parse_doctor(output: str) -> dict[str, DoctorLine]:
    """Check id -> its line, from doctor's plain (piped) output."""
    checks: dict[str, DoctorLine] = {}
    current: DoctorLine | None = None
    for line in output.splitlines():
        match = re.fullmatch(r"\[(.)\] (\S+)  (.*)", line)
        if match:
            current = checks[match[2]] = DoctorLine(match[1], match[3])
        elif current is not None and line.startswith("    "):
            current.more.append(line.strip())
        else:
            current = None
    return checks


@dataclass
class Demo:
    """The sandbox, the agent's config, and the outcomes checked so far."""

    sandbox: Sandbox
    binary: str
    failures: list[str] = field(default_factory=list)
    checks: int = 0
    steps: int = 0
    person_text: str = ""

    @property
    def config(self) -> Path:
        return self.sandbox.root / CONFIG_NAME

    @property
    def registry_file(self) -> Path:
        return self.sandbox.registry_dir() / "hosts.toml"

    def step(self, title: str) -> None:
        self.steps += 1
        rule = "─" * max(0, 78 - len(title) - 7)
        print(f"\n{_style(f'── {self.steps}. {title} ', '1;36')}{_style(rule, '36')}")

    def say(self, text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            print(f"  {line}")

    def show_file(self, path: Path) -> None:
        print(_style(f"  {path}:", "2"))
        self.say(redact_hosts_toml(path.read_text()))  # header values are credentials

    def run(self, *argv: str, expect_exit: int | None = 0) -> subprocess.CompletedProcess[str]:
        """Run `spegel-node ARGV --config spegel-node.toml` in the sandbox dir; print it all."""
        args = [*argv, "--config", CONFIG_NAME]
        print(_style(f"$ spegel-node {' '.join(args)}", "1"))
        result = subprocess.run(
            [self.binary, *args],
            cwd=self.sandbox.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
        self.say(result.stdout)
        if expect_exit is not None:
            self.expect(
                result.returncode == expect_exit,
                f"spegel-node {argv[0]} exits {expect_exit}"
                + ("" if result.returncode == expect_exit else f" (got {result.returncode})"),
            )
        return result

    def doctor(self, expect_exit: int) -> dict[str, DoctorLine]:
        """Run `spegel-node doctor` (plain lines: stdout is a pipe); its checks by id."""
        began = time.monotonic()
        result = self.run("doctor", expect_exit=expect_exit)
        took = time.monotonic() - began
        self.expect(took < 5, f"doctor finished in {took:.2f}s (< 5 s)")
        self.expect("s3cr3t" not in result.stdout, "no header value in doctor's report")
        return parse_doctor(result.stdout)

    def expect(self, ok: bool, what: str) -> bool:
        self.checks += 1
        mark = _style("✓", "32") if ok else _style("✗", "1;31")
        print(f"  {mark} {what}")
        if not ok:
            self.failures.append(f"step {self.steps}: {what}")
        return ok

    def pull(self) -> tuple[list[Request], list[Request]]:
        """A real pull of the sandbox image with `ctr --hosts-dir`; containerd's requests to the
        Spegel stand-in and to upstream."""
        sb = self.sandbox
        sb.mark_logs()
        cmd = f"ctr -n {sb.containerd.namespace} images pull --plain-http --hosts-dir "
        print(_style(f"$ {cmd}{sb.hosts_dir} {sb.image_ref}", "1"))
        began = time.monotonic()
        result = sb.pull()
        took = time.monotonic() - began
        self.expect(result.returncode == 0, f"the pull succeeds ({took:.2f}s)")
        if result.returncode != 0:
            self.say(result.stderr)
            return [], []
        served = _whole_pull(sb.spegel, sb.upstream)
        self.expect(served, "containerd fetched the manifest and every blob")
        return sb.spegel.containerd_requests(), sb.upstream.containerd_requests()

    def prove(self, served_by: str) -> None:
        """Pull, then show from the access logs which registry served containerd."""
        sb = self.sandbox
        spegel, upstream = self.pull()
        ns = sorted({r.ns or "-" for r in spegel})
        with_ns = f" (with ?ns={', '.join(ns)})" if spegel else ""
        print(
            f"  access logs: served by the Spegel stand-in: {len(spegel)} requests from "
            f"containerd{with_ns}; upstream: {len(upstream)}"
        )
        for request in spegel or upstream:
            print(_style(f"    {request.method} {request.path} -> {request.status}", "2"))
        if served_by == "spegel":
            self.expect(bool(spegel) and not upstream, "the Spegel stand-in served the pull")
            self.expect(
                ns == [sb.upstream.host], f"every mirror request says ?ns={sb.upstream.host}"
            )
        else:
            self.expect(bool(upstream) and not spegel, "upstream served the pull, Spegel nothing")


def _whole_pull(*registries: RegistryProc) -> bool:
    """Wait (briefly) until one registry's log holds containerd's GET of every blob of the image."""

    def complete() -> bool:
        return any(
            sum(
                r.from_containerd and r.method == "GET" and "/blobs/" in r.path
                for r in reg.requests()
            )
            >= BLOBS_PER_PULL
            for reg in registries
        )

    try:
        wait_until(complete, "containerd's requests in the access logs", timeout=2.0)
    except TimeoutError:
        return False
    return True


# --- the steps ---------------------------------------------------------------------------------


def step_node(demo: Demo) -> None:
    sb = demo.sandbox
    demo.step(f"A sandbox node on loopback (started in {sb.startup_s:.1f}s)")
    demo.say(sb.describe())
    demo.person_text = (
        "# Our registry. The token is the CI robot account's (ticket OPS-42).\n"
        f'server = "{sb.upstream.url}"\n'
        "\n"
        "[header]\n"
        '  Authorization = "Bearer s3cr3t-robot-token"\n'
    )
    sb.write_hosts_toml(demo.person_text)
    demo.say("\nSomeone already wrote a hosts.toml for the upstream registry:")
    demo.show_file(demo.registry_file)
    demo.config.write_text(
        f'registries = ["{sb.upstream.url}"]\n'
        f'node_ip = "127.0.0.1"            # the Spegel mirror URL is http://NODE_IP:HOST_PORT\n'
        f"host_port = {sb.spegel.port}               # where the Spegel stand-in listens\n"
        f'hosts_dir = "{sb.hosts_dir}"\n'
        f'containerd_socket = "{sb.containerd.socket}"\n'
        f'containerd_config = "{sb.containerd.config_path}"\n'
    )
    demo.say("\nspegel-node's config for this node (the sandbox's paths are not a known layout):")
    demo.show_file(demo.config)


def step_before(demo: Demo) -> None:
    demo.step("Before: containerd pulls straight from upstream")
    demo.prove(served_by="upstream")


def step_detect(demo: Demo) -> None:
    demo.step("Detect the node's containerd layout")
    result = demo.run("detect")
    demo.expect(str(demo.sandbox.hosts_dir) in result.stdout, "the sandbox's hosts dir is found")


def step_dry_run(demo: Demo) -> None:
    demo.step("What apply would change (header values are never printed)")
    result = demo.run("apply", "--dry-run")
    demo.expect("would update" in result.stdout, "the plan merges into the existing file")
    demo.expect("s3cr3t" not in result.stdout, "the Authorization value is redacted")
    demo.expect(demo.registry_file.read_text() == demo.person_text, "--dry-run wrote nothing")


def step_apply(demo: Demo) -> None:
    demo.step("Apply: the Spegel mirror is merged in, everything else is kept")
    demo.run("apply")
    text = demo.registry_file.read_text()
    demo.show_file(demo.registry_file)
    url = demo.sandbox.spegel.url
    demo.expect(f'[host."{url}"]' in text, f"hosts.toml lists the mirror {url}")
    demo.expect(text.startswith(demo.person_text.splitlines()[0]), "the person's lines are kept")


def step_pull_through_spegel(demo: Demo) -> None:
    demo.step("A real pull: containerd asks the Spegel stand-in")
    demo.prove(served_by="spegel")


def step_apply_again(demo: Demo) -> None:
    demo.step("Apply again (the systemd timer does this every minute): nothing to do")
    before = demo.registry_file.stat().st_mtime_ns
    result = demo.run("apply")
    demo.expect("nothing to change" in result.stdout, "nothing to change")
    demo.expect(demo.registry_file.stat().st_mtime_ns == before, "hosts.toml not rewritten")


def step_validate(demo: Demo) -> None:
    demo.step("Validate the hosts dir with containerd's rules")
    demo.run("validate")


def step_doctor(demo: Demo) -> None:
    demo.step("Doctor: the whole chain, read-only; healthy, so it exits 0")
    checks = demo.doctor(expect_exit=0)
    failed = [name for name, line in checks.items() if line.failed]
    demo.expect(not failed, f"no check fails{f' (failed: {failed})' if failed else ''}")
    config_path = checks.get("containerd.config_path")
    demo.expect(
        config_path is not None and "from the running containerd" in config_path.summary,
        "config_path comes live from containerd's CRI status",
    )
    v2 = checks.get("spegel.v2")
    demo.expect(v2 is not None and v2.symbol == "✓", "spegel.v2: the mirror answers /v2/")


def step_doctor_spegel_stopped(demo: Demo) -> None:
    sb = demo.sandbox
    demo.step("Doctor with Spegel stopped: spegel.v2 fails and says what to do")
    sb.spegel.stop()
    demo.say(f"(the Spegel stand-in on {sb.spegel.url} is stopped)")
    try:
        checks = demo.doctor(expect_exit=1)
        v2 = checks.get("spegel.v2")
        demo.expect(
            v2 is not None and v2.failed and "connection refused" in v2.summary,
            "spegel.v2 fails: connection refused",
        )
        demo.expect(
            v2 is not None and "check the Spegel pod" in v2.text and "health gate" in v2.text,
            "with its remediation: check the Spegel pod; the health gate withdraws the mirror",
        )
        failed = [name for name, line in checks.items() if line.failed]
        demo.expect(failed == ["spegel.v2"], f"only spegel.v2 fails (failed: {', '.join(failed)})")
    finally:
        sb.spegel.start()
    demo.say("(the Spegel stand-in is started again)")


def step_doctor_broken_file(demo: Demo) -> None:
    sb = demo.sandbox
    name = f"hosts.{sb.upstream.host}"
    demo.step("Doctor with a broken hosts.toml: containerd would drop it, doctor says why")
    path = demo.registry_file
    backup = path.read_bytes()
    broken = backup.decode().replace('capabilities = ["pull", "resolve"]', 'capabilities = "pull"')
    demo.expect(broken != backup.decode(), 'a person writes capabilities = "pull" (a string)')
    path.write_text(broken)
    try:
        demo.show_file(path)
        checks = demo.doctor(expect_exit=1)
        hosts = checks.get(name)
        demo.expect(
            hosts is not None and hosts.failed and "capabilities.type" in hosts.summary,
            f"{name} fails, naming the finding: capabilities.type",
        )
        demo.expect(
            hosts is not None and "dropped by containerd" in hosts.summary,
            "and what containerd does with such a file: drops it",
        )
        v2 = checks.get("spegel.v2")
        demo.expect(v2 is not None and v2.symbol == "✓", "spegel.v2 passes again (restarted)")
        demo.say("\ncontainerd agrees: with the file dropped, the pull skips Spegel:")
        demo.prove(served_by="upstream")
    finally:
        path.write_bytes(backup)
    demo.expect(path.read_bytes() == backup, "hosts.toml restored as apply wrote it")


def step_remove(demo: Demo) -> None:
    demo.step("Remove: the person's file comes back byte for byte")
    demo.run("remove")
    demo.show_file(demo.registry_file)
    demo.expect(demo.registry_file.read_text() == demo.person_text, "restored byte for byte")


def step_after(demo: Demo) -> None:
    demo.step("After remove: the next pull goes upstream again")
    demo.prove(served_by="upstream")


STEPS: Sequence[Callable[[Demo], None]] = (
    step_node,
    step_before,
    step_detect,
    step_dry_run,
    step_apply,
    step_pull_through_spegel,
    step_apply_again,
    step_validate,
    step_doctor,
    step_doctor_spegel_stopped,
    step_doctor_broken_file,
    step_remove,
    step_after,
)


# --- running -------------------------------------------------------------------------------------


def _preflight() -> str | None:
    if os.geteuid() != 0:
        return "the demo runs containerd: run it as root"
    missing = missing_binaries()
    if missing:
        return f"missing {', '.join(missing)}: run `make demo` (it installs them)"
    if (STATE_DIR / "state.json").exists():
        return (
            f"{STATE_DIR}/state.json exists: spegel-node manages this machine; the demo "
            "would share that record, so it does not run here"
        )
    return None


def _forget_record(sandbox: Sandbox, made_state_dir: bool) -> None:
    """Leave no trace of the demo's record, even when it stopped half way."""
    record = STATE_DIR / "state.json"
    if record.exists() and str(sandbox.hosts_dir) in record.read_text(errors="replace"):
        record.unlink()
    if made_state_dir and STATE_DIR.is_dir():
        (STATE_DIR / "lock").unlink(missing_ok=True)
        if not any(STATE_DIR.iterdir()):
            STATE_DIR.rmdir()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the Sandbox context manager


def main() -> int:
    problem = _preflight()
    if problem:
        print(f"demo: {problem}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    binary = spegel_node_binary()
    began = time.monotonic()
    made_state_dir = not STATE_DIR.exists()
    print(_style("spegel-node demo: a sandbox node, a real containerd, real registries", "1"))
    print("starting containerd, the upstream registry and the Spegel stand-in ...")
    try:
        with Sandbox() as sandbox:
            demo = Demo(sandbox, binary)
            try:
                for run_step in STEPS:
                    run_step(demo)
            finally:
                _forget_record(sandbox, made_state_dir)
    except KeyboardInterrupt:
        print("\ndemo: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    took = time.monotonic() - began
    print(
        f"\n{_style('── Stopped', '1;36')} containerd and both registries; removed {sandbox.root}"
    )
    if demo.failures:
        print(_style(f"\n{len(demo.failures)} of {demo.checks} checks failed:", "1;31"))
        for failure in demo.failures:
            print(f"  ✗ {failure}")
        return 1
    print(_style(f"\nall {demo.checks} checks passed in {took:.1f}s", "1;32"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`spegel-node run` as a real subprocess on a fake node tree: repair, reload, stop."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.v2stub import v2_server

HOSTS = "etc/containerd/certs.d"
SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture
def v2_port() -> Iterator[int]:
    with v2_server() as port:
        yield port


def config_text(port: int) -> str:
    return (
        'registries = ["https://docker.io", "https://ghcr.io"]\n'
        f'node_ip = "127.0.0.1"\nhost_port = {port}\nprobe_interval = "200ms"\n'
    )


@pytest.fixture
def node(tmp_path: Path, v2_port: int) -> Path:
    root = tmp_path / "node"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/{HOSTS}"\n'
    )
    (root / "run/containerd").mkdir(parents=True)
    (root / "run/containerd/containerd.sock").touch()
    (root / "etc/spegel-node").mkdir(parents=True)
    (root / "etc/spegel-node/config.toml").write_text(config_text(v2_port))
    return root


def start(root: Path, ready: Path, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("JOURNAL_STREAM", None)
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spegel_node",
            "run",
            "--root",
            str(root),
            "--ready-file",
            str(ready),
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(proc: subprocess.Popen[str], cond: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll `cond` until it holds; fail at the deadline or when the process died."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        try:
            code = proc.wait(timeout=0.005)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"spegel-node run exited early with {code}: {proc.stderr.read()}")  # type: ignore[union-attr]


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    return proc.returncode, err


def spegel_first(path: Path, port: int) -> bool:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return False
    return f'[host."http://127.0.0.1:{port}"]' in text


def test_run_repairs_a_recreated_file_and_exits_0_on_sigterm(
    node: Path, tmp_path: Path, v2_port: int
) -> None:
    ready = tmp_path / "ready"
    proc = start(node, ready)
    try:
        wait_for(proc, ready.exists)
        ghcr = node / HOSTS / "ghcr.io/hosts.toml"
        assert spegel_first(ghcr, v2_port)
        # k3s-style: delete, then recreate without the Spegel host
        ghcr.unlink()
        ghcr.write_text('server = "https://ghcr.io"\n\n[host."https://cache.example.com"]\n')
        wait_for(proc, lambda: spegel_first(ghcr, v2_port))
        text = ghcr.read_text()
        assert "https://cache.example.com" in text
        assert text.index(f"127.0.0.1:{v2_port}") < text.index("cache.example.com")
        # a whole registry dir removed comes back too
        (node / HOSTS / "docker.io/hosts.toml").unlink()
        (node / HOSTS / "docker.io").rmdir()
        wait_for(proc, lambda: spegel_first(node / HOSTS / "docker.io/hosts.toml", v2_port))
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "event=start" in err and "event=ready" in err
    assert "reason=change" in err
    assert "event=stop" in err
    assert not ready.exists()


def test_sighup_with_a_bad_config_keeps_the_last_good_one(
    node: Path, tmp_path: Path, v2_port: int
) -> None:
    ready = tmp_path / "ready"
    proc = start(node, ready)
    try:
        wait_for(proc, ready.exists)
        (node / "etc/spegel-node/config.toml").write_text('bogus_key = "x"\n')
        proc.send_signal(signal.SIGHUP)
        # the reload failed; it must still repair with the old config
        ghcr = node / HOSTS / "ghcr.io/hosts.toml"
        ghcr.unlink()
        wait_for(proc, lambda: spegel_first(ghcr, v2_port))
        assert proc.poll() is None
    finally:
        code, err = stop(proc)
    assert code == 0, err
    reload_lines = [line for line in err.splitlines() if "event=reload" in line]
    assert reload_lines and "level=error" in reload_lines[0]
    assert "bogus_key" in reload_lines[0]


def test_bad_config_at_start_exits_2(node: Path, tmp_path: Path) -> None:
    (node / "etc/spegel-node/config.toml").write_text('probe_interval = "soon"\n')
    proc = start(node, tmp_path / "ready")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "probe_interval" in err
    assert not (node / HOSTS).exists()


def metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value of a Prometheus text exposition (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_textfile_is_doctors_and_refreshed_after_sighup(
    node: Path, tmp_path: Path, v2_port: int
) -> None:
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    prom = textfile_dir / "spegel_node.prom"
    ready = tmp_path / "ready"
    proc = start(node, ready, "--textfile", str(prom))
    try:
        wait_for(proc, prom.exists)
        first = metrics(prom.read_text())
        assert first['spegel_node_check_status{id="hosts.ghcr.io",status="pass"}'] == 1
        assert first['spegel_node_check_status{id="spegel.v2",status="pass"}'] == 1
        stamp = "spegel_node_doctor_last_run_timestamp_seconds"
        # the file is not rewritten within the minute; SIGHUP (a reload) refreshes it
        proc.send_signal(signal.SIGHUP)
        wait_for(proc, lambda: metrics(prom.read_text())[stamp] > first[stamp])
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "event=doctor" in err and f"textfile={prom}" in err
    assert sorted(p.name for p in textfile_dir.iterdir()) == ["spegel_node.prom"]  # no temp left
    # the same series as `doctor --textfile` on the same node
    own = textfile_dir / "doctor.prom"
    env = dict(os.environ, PYTHONPATH=str(SRC))
    done = subprocess.run(
        [sys.executable, "-m", "spegel_node", "doctor", "--root", str(node), "--textfile", str(own)],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    assert set(metrics(own.read_text())) == set(metrics(prom.read_text()))


def test_textfile_in_a_missing_dir_exits_2(node: Path, tmp_path: Path) -> None:
    proc = start(node, tmp_path / "ready", "--textfile", str(tmp_path / "nope/x.prom"))
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "--textfile" in err and len(err.strip().splitlines()) == 1
    assert not (node / HOSTS).exists()


def test_doctor_only_writes_nothing_to_the_node(node: Path, tmp_path: Path) -> None:
    """--doctor-only (Talos, Bottlerocket pods): doctor's results, and the node untouched."""
    before = sorted(str(p.relative_to(node)) for p in node.rglob("*"))
    prom = tmp_path / "spegel_node.prom"
    ready = tmp_path / "ready"
    proc = start(node, ready, "--doctor-only", "--textfile", str(prom))
    try:
        wait_for(proc, prom.exists)
        got = metrics(prom.read_text())
        # nothing applied: the hosts files doctor looks for are missing
        assert got['spegel_node_check_status{id="hosts.ghcr.io",status="pass"}'] == 0
        assert got["spegel_node_doctor_ok"] == 0
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "mode=doctor-only" in err and "event=doctor" in err and "failed=" in err
    assert "event=apply" not in err
    assert sorted(str(p.relative_to(node)) for p in node.rglob("*")) == before


class _Switch(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(type(self).status if self.path == "/v2/" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_probe_only_cycles_still_feed_the_gate(node: Path, tmp_path: Path) -> None:
    """Healthy probes are the request alone (stop's probes= counts them); the first failure goes
    through the full apply, so the gate still withdraws after gate_failures and restores on the
    first success."""

    class Handler(_Switch):
        status = 200

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    (node / "etc/spegel-node/config.toml").write_text(config_text(port))
    ghcr = node / HOSTS / "ghcr.io/hosts.toml"
    ready = tmp_path / "ready"
    proc = start(node, ready)
    try:
        wait_for(proc, ready.exists)
        assert spegel_first(ghcr, port)
        Handler.status = 503
        wait_for(proc, lambda: not spegel_first(ghcr, port))  # withdrawn
        Handler.status = 200
        wait_for(proc, lambda: spegel_first(ghcr, port))  # restored
        # a few healthy cycles again (200ms each): they are probe-only
        deadline = time.monotonic() + 1.0
        wait_for(proc, lambda: time.monotonic() > deadline)
    finally:
        code, err = stop(proc)
        server.shutdown()
        server.server_close()
    assert code == 0, err
    assert "withdrawing mirror" in err and "answers again" in err
    (stop_line,) = [line for line in err.splitlines() if "event=stop" in line]
    probes = int(stop_line.split("probes=")[1].split()[0])
    assert probes >= 2, stop_line
    assert float(stop_line.split("cpu_s=")[1].split()[0]) > 0

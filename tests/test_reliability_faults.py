"""Faults around apply: concurrent runs, a read-only hosts dir, a full filesystem, a vanished hosts
dir, files replaced by directories, a state dir apply may not write.

Mount tricks run in a private mount namespace (`unshare --mount`): the mounts die with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from support.cli import run_cli, tree_state
from support.faults import (
    SECRET_FILE,
    SPEGEL_NODE,
    after_scan,
    console,
    hosts,
    hosts_files,
    in_private_mount_ns,
    make_node,
    need_console_script,
    one_line_error,
    state_dir,
    temp_files,
)

from spegel_node import apply as apply_module
from spegel_node.cli import main


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A node with a person's ghcr.io file (merge) and nothing else (creates)."""
    root = make_node(tmp_path / "node")
    (hosts(root) / "ghcr.io").mkdir(parents=True)
    (hosts(root) / "ghcr.io/hosts.toml").write_text(SECRET_FILE)
    return root


def _expected(node: Path, tmp_path: Path) -> dict[str, bytes]:
    """What one apply makes of this node (run on a copy)."""
    copy = tmp_path / "reference"
    shutil.copytree(node, copy, symlinks=True)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["apply", "--no-gate", "--root", str(copy)]) == 0
    return hosts_files(copy)


def _record_matches_disk(root: Path) -> None:
    record = json.loads((state_dir(root) / "state.json").read_text())
    for key, entry in record["files"].items():
        data = (hosts(root) / key).read_bytes()
        assert entry["written_sha256"] == hashlib.sha256(data).hexdigest(), key


# --- concurrency ---------------------------------------------------------------------------------


def test_eight_concurrent_applies_give_the_result_of_one(node: Path, tmp_path: Path) -> None:
    need_console_script()
    expected = _expected(node, tmp_path)
    procs = [
        subprocess.Popen(
            [str(SPEGEL_NODE), "apply", "--no-gate", "--root", str(node), "--output", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0] * 8, results
    changed = sorted(len(json.loads(out)["changes"]) for _, out, _ in results)
    assert changed == [0] * 7 + [len(expected)]  # one run wrote, the seven others found it done
    assert hosts_files(node) == expected
    assert temp_files(node) == []
    _record_matches_disk(node)
    # and remove still gives the person's file back byte for byte
    assert console(node, "remove").returncode == 0
    assert hosts_files(node) == {"ghcr.io": SECRET_FILE.encode()}


def test_concurrent_apply_and_remove_leave_a_consistent_node(node: Path, tmp_path: Path) -> None:
    need_console_script()
    expected = _expected(node, tmp_path)
    commands = ["apply", "remove"] * 4
    procs = [
        subprocess.Popen(
            [str(SPEGEL_NODE), c, "--root", str(node)] + (["--no-gate"] if c == "apply" else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in commands
    ]
    assert [p.wait(timeout=60) for p in procs] == [0] * 8
    assert hosts_files(node) in (expected, {"ghcr.io": SECRET_FILE.encode()})
    assert temp_files(node) == []
    assert console(node, "apply", "--no-gate").returncode == 0
    assert hosts_files(node) == expected
    assert console(node, "remove").returncode == 0
    assert hosts_files(node) == {"ghcr.io": SECRET_FILE.encode()}


# --- read-only hosts dir ---------------------------------------------------------------------------


def _ns_run(script: str) -> subprocess.CompletedProcess[str]:
    need_console_script()
    return in_private_mount_ns(script)


def _spegel(root: Path, *args: str) -> str:
    return " ".join(shlex.quote(a) for a in (str(SPEGEL_NODE), *args, "--root", str(root)))


@pytest.mark.parametrize("command", ["apply", "remove"])
def test_read_only_hosts_dir_is_exit_1_and_nothing_changes(node: Path, command: str) -> None:
    if command == "remove":
        assert console(node, "apply", "--no-gate").returncode == 0
    h = shlex.quote(str(hosts(node)))
    before = tree_state(hosts(node))
    proc = _ns_run(
        f"mount --bind {h} {h}\nmount -o remount,bind,ro {h}\n"
        f"{_spegel(node, command, '--no-gate') if command == 'apply' else _spegel(node, command)}"
    )
    assert proc.returncode == 1, proc
    line = one_line_error(proc.stderr)
    assert "read-only file system" in line
    assert "/etc/containerd/certs.d/" in line
    assert str(node) not in line  # node paths, not host paths
    assert tree_state(hosts(node)) == before
    assert temp_files(node) == []


# --- full filesystem -----------------------------------------------------------------------------


def _fill(path: str) -> str:
    """Shell lines that fill the filesystem holding `path` (dd stops at ENOSPC)."""
    return f"dd if=/dev/zero of={path}/.filler bs=4k 2>/dev/null || true\nsync\n"


def test_full_hosts_filesystem_is_exit_1_and_existing_files_stay(
    node: Path, tmp_path: Path
) -> None:
    """The hosts dir on a 256 KiB tmpfs, filled up: the merge cannot be written."""
    h = shlex.quote(str(hosts(node)))
    seed = tmp_path / "seed"
    shutil.copytree(hosts(node), seed)
    out = tmp_path / "after"
    proc = _ns_run(
        f"mount -t tmpfs -o size=256k,mode=0755 tmpfs {h}\n"
        f"cp -a {shlex.quote(str(seed))}/. {h}/\n"
        f"{_fill(h)}"
        f"set +e\n{_spegel(node, 'apply', '--no-gate')}\necho $? > {out}.rc\nset -e\n"
        f"rm {h}/.filler\ncp -a {h}/. {shlex.quote(str(out))}/\n"
    )
    assert proc.returncode == 0, proc
    assert (tmp_path / "after.rc").read_text().strip() == "1"
    line = one_line_error(proc.stderr)
    assert "no space left on device" in line
    after = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert after == sorted(p.relative_to(seed) for p in seed.rglob("*"))  # no new (empty) dirs
    assert (out / "ghcr.io/hosts.toml").read_text() == SECRET_FILE  # intact
    assert temp_files(out) == []


def test_full_state_filesystem_is_exit_1_and_hosts_files_stay(node: Path) -> None:
    s = shlex.quote(str(state_dir(node)))
    before = tree_state(hosts(node))
    proc = _ns_run(
        f"mkdir -p {s}\nmount -t tmpfs -o size=64k,mode=0700 tmpfs {s}\n{_fill(s)}"
        f"{_spegel(node, 'apply', '--no-gate')}"
    )
    assert proc.returncode == 1, proc
    line = one_line_error(proc.stderr)
    assert "cannot write the state under /var/lib/spegel-node: no space left on device" in line
    assert tree_state(hosts(node)) == before  # the record is written first: nothing was touched


# --- vanished hosts dir, files replaced by directories -------------------------------------------


def test_vanished_hosts_dir_is_recreated(capsys: pytest.CaptureFixture[str], node: Path) -> None:
    assert run_cli(capsys, "apply", "--no-gate", "--root", str(node)).code == 0
    shutil.rmtree(hosts(node))
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(node))
    assert result.code == 0, result.err
    assert set(hosts_files(node)) == {
        "docker.io",
        "ghcr.io",
        "quay.io",
        "gcr.io",
        "registry.k8s.io",
        "127.0.0.1:5000",
    }
    assert all(
        data.startswith(b"# managed by spegel-node\n") for data in hosts_files(node).values()
    )
    _record_matches_disk(node)
    assert run_cli(capsys, "remove", "--root", str(node)).code == 0
    assert list(hosts(node).iterdir()) == []


def test_hosts_dir_vanishing_during_apply_is_exit_1_then_converges(
    capsys: pytest.CaptureFixture[str], node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    after_scan(monkeypatch, shutil.rmtree)
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(node))
    assert result.code == 1
    # the files apply creates go into the hosts dir it makes again; the one it had to update is
    # listed (per-file isolation) and left for the next run
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "vanished; run apply again" in lines[0], result.err
    assert "Traceback" not in result.err
    monkeypatch.undo()
    assert run_cli(capsys, "apply", "--no-gate", "--root", str(node)).code == 0
    assert len(hosts_files(node)) == 6
    assert temp_files(node) == []


def test_hosts_toml_replaced_by_a_directory_is_refused_others_written(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    (hosts(node) / "quay.io/hosts.toml").mkdir(parents=True)
    (hosts(node) / "quay.io/hosts.toml/keep").write_text("x")
    (hosts(node) / "gcr.io").write_text("a file where a registry dir belongs")
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(node))
    assert result.code == 1
    problems = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert problems == [
        "error: /etc/containerd/certs.d/quay.io/hosts.toml is not a regular file; move it aside",
        "error: /etc/containerd/certs.d/gcr.io is not a directory; move it aside",
    ]
    assert (hosts(node) / "quay.io/hosts.toml/keep").read_text() == "x"
    assert (hosts(node) / "gcr.io").read_text() == "a file where a registry dir belongs"
    assert set(hosts_files(node)) == {"docker.io", "ghcr.io", "registry.k8s.io", "127.0.0.1:5000"}
    result = run_cli(capsys, "remove", "--root", str(node))
    assert result.code == 0, result.err
    assert hosts_files(node) == {"ghcr.io": SECRET_FILE.encode()}
    assert (hosts(node) / "quay.io/hosts.toml/keep").read_text() == "x"


def test_fifo_hosts_toml_is_refused_without_hanging(node: Path) -> None:
    os.mkfifo(hosts(node) / "ghcr.io/fifo")
    os.replace(hosts(node) / "ghcr.io/fifo", hosts(node) / "ghcr.io/hosts.toml")
    for args in (["apply", "--no-gate"], ["validate"], ["remove"]):
        proc = console(node, *args, timeout=30)
        assert "Traceback" not in proc.stderr
        assert proc.returncode == (0 if args == ["remove"] else 1), proc
    assert hosts_files(node) == {}  # the files apply created are gone again
    assert (hosts(node) / "ghcr.io/hosts.toml").is_fifo()


# --- a state dir apply may not write ---------------------------------------------------------------


@pytest.fixture
def applied(node: Path) -> Path:
    """The node after one apply, with a config change pending (so the next apply must write)."""
    assert console(node, "apply", "--no-gate").returncode == 0
    config = node / "etc/spegel-node/config.toml"
    config.write_text(config.read_text() + "host_port = 30020\n")
    return node


def _refused_and_untouched(node: Path, proc: subprocess.CompletedProcess[str], says: str) -> None:
    assert proc.returncode == 1, proc
    line = one_line_error(proc.stderr)
    assert says in line, line
    assert "/var/lib/spegel-node" in line


def test_read_only_state_dir_is_exit_1_and_hosts_untouched(applied: Path) -> None:
    s = shlex.quote(str(state_dir(applied)))
    before = tree_state(hosts(applied))
    proc = _ns_run(
        f"mount --bind {s} {s}\nmount -o remount,bind,ro {s}\n"
        f"{_spegel(applied, 'apply', '--no-gate')}"
    )
    _refused_and_untouched(applied, proc, "read-only file system")
    assert tree_state(hosts(applied)) == before


def test_permission_denied_state_dir_is_exit_1_and_hosts_untouched(applied: Path) -> None:
    """Root without CAP_DAC_OVERRIDE/CAP_FOWNER meets a state dir it does not own."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux)")
    os.chown(state_dir(applied), 65534, 65534)
    before = tree_state(hosts(applied))
    drop = "-dac_override,-dac_read_search,-fowner"
    setpriv = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--"]
    proc = subprocess.run(
        [*setpriv, str(SPEGEL_NODE), "apply", "--no-gate", "--root", str(applied)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _refused_and_untouched(applied, proc, "permission denied")
    assert tree_state(hosts(applied)) == before


def test_immutable_state_dir_is_exit_1_and_hosts_untouched(applied: Path) -> None:
    s = state_dir(applied)
    if shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("needs root and chattr")
    if subprocess.run(["chattr", "+i", str(s)], capture_output=True, check=False).returncode:
        pytest.skip("the filesystem under the tests has no immutable flag")
    try:
        before = tree_state(hosts(applied))
        proc = console(applied, "apply", "--no-gate")
        _refused_and_untouched(applied, proc, "operation not permitted")
        assert tree_state(hosts(applied)) == before
    finally:
        subprocess.run(["chattr", "-i", str(s)], check=True)


def test_state_dir_that_is_a_symlink_is_refused(applied: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    state_dir(applied).rename(elsewhere)
    state_dir(applied).symlink_to(elsewhere)
    before = tree_state(elsewhere)
    proc = console(applied, "apply", "--no-gate")
    assert proc.returncode == 1
    assert "is a symlink" in one_line_error(proc.stderr)
    assert tree_state(elsewhere) == before


def test_corrupt_state_record_is_exit_1_and_nothing_written(applied: Path) -> None:
    (state_dir(applied) / "state.json").write_text('{"files": {"x": 1}')
    before = tree_state(applied)
    for command in ("apply", "remove"):
        proc = console(applied, command)
        assert proc.returncode == 1
        assert "is corrupt" in one_line_error(proc.stderr)
    assert tree_state(applied) == before


def test_an_unexpected_os_error_is_still_one_line(
    capsys: pytest.CaptureFixture[str], node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error", "/dev/vdz")

    monkeypatch.setattr(apply_module, "apply_mirrors", boom)
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(node))
    assert result.code == 1
    assert one_line_error(result.err) == "spegel-node: error: Input/output error: /dev/vdz"


# --- doctor never writes (a cross-check; tests/test_doctor.py has its own) -----------------------


@pytest.mark.parametrize("after_apply", [False, True])
def test_doctor_never_writes(
    capsys: pytest.CaptureFixture[str], node: Path, after_apply: bool
) -> None:
    config = node / "etc/spegel-node/config.toml"
    config.write_text(config.read_text().replace("10.0.0.5", "127.0.0.1") + "host_port = 9\n")
    if after_apply:
        assert run_cli(capsys, "apply", "--no-gate", "--root", str(node)).code == 0
        (hosts(node) / "docker.io/hosts.toml").write_text("broken = [\n")  # drift to report
    before = tree_state(node)
    for output in ("text", "json"):
        result = run_cli(capsys, "doctor", "--root", str(node), "--output", output)
        assert result.code in (0, 1)
        assert "Traceback" not in result.err
    assert tree_state(node) == before
    assert (state_dir(node) / "lock").exists() is after_apply  # not even the lock file

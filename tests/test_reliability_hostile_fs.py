"""A hostile hosts dir: symlinks out of it (found at the scan or swapped in just after), planted
temp names, and any umask. Nothing outside the hosts dir is ever written; modes are fixed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support.cli import run_cli, tree_state
from support.faults import (
    SECRET_FILE,
    after_scan,
    console,
    hosts,
    hosts_files,
    make_node,
    need_console_script,
    state_dir,
    temp_files,
)

from spegel_node.fsutil import TMP_PREFIX

OUTSIDE_TEXT = "# not spegel-node's to touch\n"


@pytest.fixture
def node(tmp_path: Path) -> Path:
    return make_node(tmp_path / "node", registries=["https://docker.io", "https://ghcr.io"])


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the hosts dir with a hosts.toml-looking file in it."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "hosts.toml").write_text(OUTSIDE_TEXT)
    (d / "passwd").write_text("root:x:0:0\n")
    return d


def _apply(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, list[str]]:
    result = run_cli(capsys, *args, "--root", str(root))
    assert "Traceback" not in result.err
    problems = [line for line in result.err.splitlines() if line.startswith("error: ")]
    return result.code, problems


@pytest.mark.parametrize("target", ["outside", "sibling"])
def test_registry_dir_symlink_is_refused_not_followed(
    capsys: pytest.CaptureFixture[str], node: Path, outside: Path, target: str
) -> None:
    if target == "sibling":  # pointing inside the hosts dir is refused just the same
        (hosts(node) / "quay.io").mkdir()
        (hosts(node) / "ghcr.io").symlink_to("quay.io")
    else:
        (hosts(node) / "ghcr.io").symlink_to(outside)
    before = tree_state(outside)
    code, problems = _apply(capsys, node, "apply", "--no-gate")
    assert code == 1
    assert problems == [
        "error: /etc/containerd/certs.d/ghcr.io is a symlink; refusing to write through it "
        "(replace it with a directory)"
    ]
    assert set(hosts_files(node)) == {"docker.io"}  # the other registry is served
    assert tree_state(outside) == before
    if target == "sibling":
        assert list((hosts(node) / "quay.io").iterdir()) == []
    assert (hosts(node) / "ghcr.io").is_symlink()  # refused, not replaced


def test_hosts_toml_symlink_is_refused_not_followed(
    capsys: pytest.CaptureFixture[str], node: Path, outside: Path
) -> None:
    (hosts(node) / "ghcr.io").mkdir(parents=True)
    (hosts(node) / "ghcr.io/hosts.toml").symlink_to(outside / "hosts.toml")
    code, problems = _apply(capsys, node, "apply", "--no-gate")
    assert code == 1
    assert problems == [
        "error: /etc/containerd/certs.d/ghcr.io/hosts.toml is a symlink; refusing to write "
        "through it (replace it with a file)"
    ]
    assert (outside / "hosts.toml").read_text() == OUTSIDE_TEXT
    assert (hosts(node) / "ghcr.io/hosts.toml").is_symlink()
    assert set(hosts_files(node)) == {"docker.io"}


def test_remove_never_deletes_through_a_symlink(
    capsys: pytest.CaptureFixture[str], node: Path, outside: Path
) -> None:
    assert _apply(capsys, node, "apply", "--no-gate")[0] == 0
    # a dir apply created is swapped for a link to a dir that holds a managed-looking file
    docker = hosts(node) / "docker.io"
    (outside / "hosts.toml").write_bytes((docker / "hosts.toml").read_bytes())
    (docker / "hosts.toml").unlink()
    docker.rmdir()
    docker.symlink_to(outside)
    code, problems = _apply(capsys, node, "remove")
    assert code == 1
    assert problems and "docker.io is a symlink" in problems[0]
    assert (outside / "hosts.toml").exists()
    assert (outside / "passwd").read_text() == "root:x:0:0\n"
    assert not (hosts(node) / "ghcr.io").exists()  # the other registry was undone


def test_registry_dir_swapped_for_a_symlink_after_the_scan_is_not_followed(
    capsys: pytest.CaptureFixture[str],
    node: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ghcr = hosts(node) / "ghcr.io"
    ghcr.mkdir(parents=True)
    (ghcr / "hosts.toml").write_text(SECRET_FILE)

    def swap(_: Path) -> None:
        ghcr.rename(hosts(node) / "ghcr.io.moved")
        ghcr.symlink_to(outside)

    after_scan(monkeypatch, swap)
    before = tree_state(outside)
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(node))
    assert result.code == 1
    lines = result.err.strip().splitlines()  # listed with the other problems of this run
    assert len(lines) == 1 and "is a symlink (refusing to follow it)" in lines[0], result.err
    assert tree_state(outside) == before


def test_hosts_toml_swapped_for_a_symlink_after_the_scan_is_refused_not_written_through(
    capsys: pytest.CaptureFixture[str],
    node: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ghcr = hosts(node) / "ghcr.io"
    ghcr.mkdir(parents=True)
    (ghcr / "hosts.toml").write_text(SECRET_FILE)

    def swap(_: Path) -> None:
        (ghcr / "hosts.toml").unlink()
        (ghcr / "hosts.toml").symlink_to(outside / "hosts.toml")

    after_scan(monkeypatch, swap)
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(node))
    assert result.code == 1  # the re-read before the rename opens with O_NOFOLLOW
    assert "ghcr.io/hosts.toml: is a symlink (refusing to follow it)" in result.err
    assert (outside / "hosts.toml").read_text() == OUTSIDE_TEXT
    assert (ghcr / "hosts.toml").is_symlink()  # left for the operator, as the docs say


def test_planted_temp_name_symlink_is_not_followed(
    capsys: pytest.CaptureFixture[str], node: Path, outside: Path
) -> None:
    ghcr = hosts(node) / "ghcr.io"
    ghcr.mkdir(parents=True)
    (ghcr / "hosts.toml").write_text(SECRET_FILE)
    # the exact temp name this process will use, and one of a dead process
    (ghcr / f"{TMP_PREFIX}hosts.toml.{os.getpid()}").symlink_to(outside / "passwd")
    (ghcr / f"{TMP_PREFIX}hosts.toml.999999999").symlink_to(outside / "hosts.toml")
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(node))
    assert result.code == 0, result.err
    assert (outside / "passwd").read_text() == "root:x:0:0\n"
    assert (outside / "hosts.toml").read_text() == OUTSIDE_TEXT
    assert temp_files(node) == []


def test_hosts_dir_itself_may_be_a_symlink(
    capsys: pytest.CaptureFixture[str], node: Path, tmp_path: Path
) -> None:
    """As /etc/containerd/certs.d sometimes is (documented: only what is below is never followed).
    An absolute link means a path on the node, i.e. under --root."""
    real = node / "var/lib/real-certs.d"
    real.mkdir(parents=True)
    hosts(node).rmdir()
    hosts(node).symlink_to("/var/lib/real-certs.d")
    assert _apply(capsys, node, "apply", "--no-gate")[0] == 0
    assert (real / "docker.io/hosts.toml").exists()


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in root.rglob("*")}


@pytest.mark.parametrize("umask", [0o077, 0o000, 0o777, 0o022])
def test_modes_are_fixed_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    need_console_script()
    root = make_node(tmp_path / "node", registries=["https://docker.io", "http://127.0.0.1:5000"])
    (root / "etc/containerd/certs.d").rmdir()  # apply creates the hosts dir too
    before = _modes(root)
    proc = console(root, "apply", "--no-gate", umask=umask)
    assert proc.returncode == 0, proc.stderr
    modes = _modes(root)
    created = {k: v for k, v in modes.items() if k not in before}
    assert created == {
        "etc/containerd/certs.d": 0o755,
        "etc/containerd/certs.d/docker.io": 0o755,
        "etc/containerd/certs.d/docker.io/hosts.toml": 0o644,
        "etc/containerd/certs.d/127.0.0.1:5000": 0o755,
        "etc/containerd/certs.d/127.0.0.1:5000/hosts.toml": 0o644,
        "var": 0o755,
        "var/lib": 0o755,
        "var/lib/spegel-node": 0o700,
        "var/lib/spegel-node/lock": 0o600,
        "var/lib/spegel-node/state.json": 0o600,
    }
    assert {k: modes[k] for k in before} == before  # nothing that existed changed mode
    # a second run with another umask (after a change) keeps every mode
    config = root / "etc/spegel-node/config.toml"
    config.write_text(config.read_text() + "host_port = 30020\n")
    assert console(root, "apply", "--no-gate", umask=0o777 - umask).returncode == 0
    assert _modes(root) == modes


def test_a_merged_file_keeps_its_mode_and_owner(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    """A person's 0640 root:nogroup file with credentials does not become world-readable."""
    ghcr = hosts(node) / "ghcr.io/hosts.toml"
    ghcr.parent.mkdir(parents=True)
    ghcr.write_text(SECRET_FILE)
    os.chmod(ghcr, 0o640)
    os.chown(ghcr, 0, 65534)
    assert run_cli(capsys, "apply", "--no-gate", "--root", str(node)).code == 0
    st = ghcr.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 65534)
    assert b"10.0.0.5:29999" in ghcr.read_bytes()
    assert run_cli(capsys, "remove", "--root", str(node)).code == 0
    st = ghcr.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 65534)
    assert ghcr.read_text() == SECRET_FILE


def test_state_dir_with_loose_mode_is_tightened(
    capsys: pytest.CaptureFixture[str], node: Path
) -> None:
    state_dir(node).mkdir(parents=True, mode=0o755)
    os.chmod(state_dir(node), 0o755)
    assert run_cli(capsys, "apply", "--no-gate", "--root", str(node)).code == 0
    assert stat.S_IMODE(state_dir(node).stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir(node) / "state.json").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("fifo", "command", "code", "said"),
    [
        ("/etc/containerd/config.toml", "detect", 0, "not a regular file"),  # shown, not fatal
        ("/etc/containerd/config.toml", "doctor", 1, ""),
        ("/etc/spegel-node/config.toml", "apply", 2, "not a regular file"),
        ("/var/lib/spegel-node/state.json", "apply", 1, "not a regular file"),
        ("/var/lib/spegel-node/state.json", "remove", 1, "not a regular file"),
    ],
)
def test_a_fifo_in_place_of_a_file_it_reads_fails_at_once_never_hangs(
    node: Path, fifo: str, command: str, code: int, said: str
) -> None:
    path = node / fifo.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    before = tree_state(hosts(node))
    done = console(node, command, timeout=30)  # a blocking open would hang until the timeout
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    assert said in done.stderr + done.stdout
    assert tree_state(hosts(node)) == before
    assert stat.S_ISFIFO(os.lstat(path).st_mode)  # left as it was

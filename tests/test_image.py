"""The container image (`make image`) for real: built twice with the same digest from the pinned
inputs (scripts/image.lock; a tampered lock stops the build), imported into a real containerd
(Debian's 1.6.20, driven by ctr 1.7.35 for `--user`), run with Debian's runc with a fake host
tree at /host, where `apply`, `doctor` and `run` do their job through `--root /host`: doctor as
the image's default non-root user, apply and run as uid 0 (the default user cannot write)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from support.fake_nodes import make_containerd
from support.peers import peer_bin
from support.sandbox import ContainerdProc

pytestmark = pytest.mark.sandbox
REPO = Path(__file__).resolve().parents[1]
NAME = "localhost/spegel-node:test"
LOCK = REPO / "scripts/image.lock"
NONROOT = "65532"
DAEMONSET = "docs/flux/kubernetes/main/apps/kube-system/spegel-node/app/daemonset.yaml"


def _build(out: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/build_image.py"), "--out", str(out), "--name", NAME],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r"manifest (sha256:[0-9a-f]{64})", done.stdout)
    assert match, done.stdout
    return match.group(1)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    base = tmp_path_factory.mktemp("image")
    first, second = base / "a.tar", base / "b.tar"
    return first, _build(first), _build(second)


def test_two_builds_give_the_same_manifest_digest(image: tuple[Path, str, str]) -> None:
    _, first, second = image
    assert first == second


def image_config(archive: Path) -> dict[str, object]:
    import tarfile

    with tarfile.open(archive) as tar:

        def blob(digest: str) -> dict[str, object]:
            f = tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
            assert f is not None
            data: dict[str, object] = json.loads(f.read())
            return data

        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = blob(index["manifests"][0]["digest"])
        return blob(manifest["config"]["digest"])  # type: ignore[index]


def test_default_user_is_nonroot(image: tuple[Path, str, str]) -> None:
    config = image_config(image[0])["config"]
    assert config["User"] == f"{NONROOT}:{NONROOT}"  # type: ignore[index]
    assert config["Entrypoint"] == ["/usr/bin/spegel-node"]  # type: ignore[index]


def test_a_lock_that_does_not_match_stops_the_build(tmp_path: Path) -> None:
    locked = tomllib.loads(LOCK.read_text())
    assert set(locked["debs"]) and set(locked["wheels"])  # the lock pins debs and wheels
    text = LOCK.read_text()
    sha = locked["debs"]["libffi8"]["sha256"]
    bad = tmp_path / "image.lock"
    bad.write_text(text.replace(sha, "0" * 64))
    out = tmp_path / "out.tar"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/build_image.py"), "--lock", str(bad), "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "libffi8" in done.stderr and "the lock has" in done.stderr
    assert not out.exists()


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[ContainerdProc]:
    (tmp_path / "hosts").mkdir()
    proc = ContainerdProc(tmp_path / "ctd", tmp_path / "hosts")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def imported(
    image: tuple[Path, str, str], containerd: ContainerdProc, tmp_path: Path
) -> tuple[list[str], Path]:
    """The image imported; ctr's argv (1.7.35's client: Debian's 1.6 ctr has no --user) and a
    fake host tree holding a spegel-node config."""
    archive, digest, _ = image
    ctr = [str(peer_bin("containerd", "ctr", "1.7.35")), "-a", str(containerd.socket)]
    ctr += ["-n", "sandbox"]
    done = subprocess.run(
        [*ctr, "images", "import", str(archive)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and digest in done.stdout, done.stderr
    root = tmp_path / "node"
    make_containerd(root, config_path="/etc/containerd/certs.d")
    (root / "etc/spegel-node").mkdir(parents=True)
    (root / "etc/spegel-node/config.toml").write_text(
        'node_ip = "127.0.0.1"\nregistries = ["https://docker.io"]\n'
    )
    return ctr, root


def ctr_run(
    ctr: list[str], root: Path, name: str, *args: str, user: str = "", flags: tuple[str, ...] = ()
) -> list[str]:
    mount = f"type=bind,src={root},dst=/host,options=rbind:rw"
    as_user = ["--user", user] if user else []
    return [*ctr, "run", "--rm", *as_user, *flags, "--mount", mount, NAME, name, *args]


def test_imported_and_run_it_applies_and_diagnoses_the_host_tree(
    imported: tuple[list[str], Path],
) -> None:
    ctr, root = imported

    def run(name: str, *args: str, user: str = "") -> subprocess.CompletedProcess[str]:
        argv = ctr_run(ctr, root, name, "/usr/bin/spegel-node", *args, user=user)
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    whoami = subprocess.run(
        ctr_run(ctr, root, "id", "/usr/bin/python3.11", "-c", "import os; print(os.getuid())"),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert whoami.stdout.strip() == NONROOT, whoami.stderr
    # the default user cannot write the host's root-owned tree: refused, nothing written
    refused = run("apply-nonroot", "--root", "/host", "apply", "--no-gate")
    assert refused.returncode == 1, refused.stderr
    assert "ermission denied" in refused.stderr
    assert not (root / "etc/containerd/certs.d/docker.io").exists()
    # doctor as the default user, on a tree it may read (no state dir yet: a doctor-only node)
    early = run("doctor-early", "doctor", "--root", "/host", "-o", "json")
    assert early.returncode in (0, 1), early.stderr
    assert {c["id"]: c["status"] for c in json.loads(early.stdout)["checks"]}[
        "layout.detected"
    ] == "pass"
    applied = run("apply", "--root", "/host", "apply", "--no-gate", user="0:0")
    assert applied.returncode == 0, applied.stderr
    hosts = root / "etc/containerd/certs.d/docker.io/hosts.toml"
    assert hosts.read_text().startswith("# managed by spegel-node")
    assert '[host."http://127.0.0.1:29999"]' in hosts.read_text()
    # now root's 0700 state dir is there: the default user is told once that doctor needs root
    denied = run("doctor-nonroot", "doctor", "--root", "/host", "-o", "json")
    assert denied.returncode == 1 and denied.stdout == "", denied.stdout
    assert len(denied.stderr.strip().splitlines()) == 1, denied.stderr
    assert "needs root" in denied.stderr and "/var/lib/spegel-node" in denied.stderr
    doctor = run("doctor", "doctor", "--root", "/host", "-o", "json", user="0:0")
    assert doctor.returncode in (0, 1), doctor.stderr
    checks = {c["id"]: c["status"] for c in json.loads(doctor.stdout)["checks"]}
    assert checks["layout.detected"] == "pass" and checks["hosts.docker.io"] == "pass"


def wait_for(proc: subprocess.Popen[str], cond: Callable[[], bool], limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        try:
            code = proc.wait(timeout=0.01)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"ctr run exited early with {code}: {proc.stderr.read()}")  # type: ignore[union-attr]


def test_run_in_the_image_repairs_the_host_tree_and_stops_on_sigterm(
    imported: tuple[list[str], Path],
) -> None:
    ctr, root = imported
    name = f"run-{os.getpid()}"
    argv = ctr_run(
        ctr, root, name,
        "/usr/bin/spegel-node", "--root", "/host", "run", "--no-gate", "--ready-file", "/host/ready",
        user="0:0", flags=("--read-only",),  # as the DaemonSet: readOnlyRootFilesystem
    )  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hosts = root / "etc/containerd/certs.d/docker.io/hosts.toml"
    try:
        wait_for(proc, (root / "ready").exists)
        assert '[host."http://127.0.0.1:29999"]' in hosts.read_text()
        # k3s-style on the host: the file replaced by one without the Spegel host
        hosts.unlink()
        hosts.write_text('server = "https://registry-1.docker.io"\n')
        wait_for(proc, lambda: "127.0.0.1:29999" in hosts.read_text())
        # the DaemonSet's startupProbe, exec'd in the running container, on this ready file
        ds = yaml.safe_load((REPO / DAEMONSET).read_text())
        probe = ds["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["exec"]["command"]
        probe = [arg.replace("/run/spegel-node/ready", "/host/ready") for arg in probe]
        execd = subprocess.run(
            [*ctr, "task", "exec", "--exec-id", "probe", name, *probe],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert execd.returncode == 0, execd.stderr
        missing = [arg.replace("/host/ready", "/host/nothing") for arg in probe]
        execd = subprocess.run(
            [*ctr, "task", "exec", "--exec-id", "probe2", name, *missing],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert execd.returncode != 0
    finally:
        subprocess.run(
            [*ctr, "task", "kill", "-s", "SIGTERM", name], capture_output=True, timeout=30
        )
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "event=ready" in err and "reason=change" in err and "event=stop" in err
    assert not (root / "ready").exists()  # removed on the way out

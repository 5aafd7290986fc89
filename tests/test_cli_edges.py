"""The rough edges a newcomer hits (issue 15, CLI): a run without root, fix commands that keep
--config, the {node_ip} placeholder, "nothing to do" exit codes, apply's k3s registries.yaml
warning."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from support.cli import run_cli, tree_state
from support.fake_nodes import BUILDERS, RANCHER_GENERATED, make_containerd

REPO = Path(__file__).resolve().parents[1]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
PLAIN_CONFIG = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n'

# --- without root -----------------------------------------------------------------------------


def _nobody_python() -> list[str]:
    """A Python that uid 65534 may run, with this checkout's code and the runtime packages."""
    assert os.geteuid() == 0 and shutil.which("setpriv"), "run as root with util-linux's setpriv"
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (os.path.realpath(sys.executable), f"/usr/bin/{minor}"):
        probe = subprocess.run(
            [*NOBODY, python, "-c", "import typer, psutil, tomlkit, spegel_node"],
            env=_nobody_env(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        if probe.returncode == 0:
            return [python, "-m", "spegel_node"]
    raise AssertionError(f"no {minor} that uid 65534 may run with {_nobody_env()['PYTHONPATH']}")


def _runtime_packages(name: str = "spegel-node", seen: set[str] | None = None) -> set[str]:
    """The distributions spegel-node needs at run time, recursively (extras left out)."""
    seen = set() if seen is None else seen
    for line in importlib.metadata.requires(name) or []:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra, or another platform
        if requirement.name.lower() not in seen:
            seen.add(requirement.name.lower())
            _runtime_packages(requirement.name, seen)
    return seen


@functools.lru_cache(maxsize=1)
def _open_site() -> str:
    """A copy of the code and its runtime packages where uid 65534 can read them (the venv and
    the checkout may sit under a 0700 home)."""
    site = Path(tempfile.mkdtemp(prefix=f"spegel-node-nobody-site-{os.getpid()}-"))
    shutil.copytree(REPO / "src" / "spegel_node", site / "spegel_node")
    for name in _runtime_packages():
        dist = importlib.metadata.distribution(name)
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if source.is_file() and not str(file).startswith(".."):
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, site / file)
    for path in [site, *site.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    site.chmod(0o755)
    return str(site)


def _nobody_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": _open_site(), "NO_COLOR": "1", "HOME": "/"}


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temp dir uid 65534 can reach (pytest's tmp_path is under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix=f"spegel-node-nobody-{os.getpid()}-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _lock_down(root: Path, dirs: list[Path] | None = None) -> None:
    """Dirs owned by root with mode 0700 (every dir under root, or the ones given)."""
    targets = dirs if dirs is not None else [p for p in root.rglob("*") if p.is_dir()]
    for d in targets:
        d.chmod(0o700)


def _as_nobody(python: list[str], root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NOBODY, *python, *args, "--root", str(root)],
        env=_nobody_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


NODE_COMMANDS = [
    ["detect"],
    ["apply", "--no-gate"],
    ["remove"],
    ["validate"],
    ["doctor"],
    ["doctor", "-o", "json"],
    ["helm-values"],
    ["install-units", "--dry-run"],
    ["configure-containerd", "--dry-run"],
]


def _assert_one_root_line(done: subprocess.CompletedProcess[str], path: str, code: int = 1) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "needs root" in lines[0] and path in lines[0], lines[0]
    assert "bug in spegel-node" not in done.stdout + done.stderr
    assert done.stdout == ""


def test_every_node_command_says_once_that_it_needs_root(open_tmp: Path) -> None:
    python = _nobody_python()
    root = open_tmp / "node"
    make_containerd(root, config_path="/etc/containerd/certs.d")
    _lock_down(root)
    config = open_tmp / "c.toml"  # readable: the node paths are what this user may not read
    config.write_text('node_ip = "127.0.0.1"\n')
    config.chmod(0o644)
    before = tree_state(root)
    for args in NODE_COMMANDS:
        done = _as_nobody(python, root, *args, "--config", str(config))
        _assert_one_root_line(done, "permission denied on /etc/")
        assert str(root) not in done.stderr  # node paths, not the --root prefix
    assert tree_state(root) == before


def test_an_unreadable_config_is_bad_input_that_says_root(open_tmp: Path) -> None:
    """SPEC: an unreadable config is exit 2 (bad input); the line still says it needs root."""
    python = _nobody_python()
    root = open_tmp / "node"
    make_containerd(root, config_path="/etc/containerd/certs.d")
    _lock_down(root)
    before = tree_state(root)
    for args in (["apply", "--no-gate"], ["doctor"], ["detect"]):
        done = _as_nobody(python, root, *args)
        _assert_one_root_line(done, "cannot read config file /etc/spegel-node/config.toml", 2)
    assert tree_state(root) == before


@pytest.mark.parametrize("locked", ["/var/lib/spegel-node", "/etc/containerd/certs.d"])
def test_one_dir_only_root_may_read(open_tmp: Path, locked: str) -> None:
    """The issue's case: the node is readable, the state apply left (or the hosts dir) is not;
    doctor's checks used to crash ("a bug in spegel-node") or fail once per check."""
    python = _nobody_python()
    root = open_tmp / "node"
    make_containerd(root, config_path="/etc/containerd/certs.d")
    for d in [root, *root.rglob("*")]:
        d.chmod(d.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if d.is_dir() else 0))
    code = subprocess.run(
        [sys.executable, "-m", "spegel_node", "apply", "--no-gate", "--root", str(root)],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        timeout=60,
        check=False,
    ).returncode
    assert code == 0
    _lock_down(root, [root / locked.lstrip("/")])
    before = tree_state(root)
    textfile = open_tmp / "doctor.prom"
    open_tmp.chmod(0o777)
    doctor = _as_nobody(python, root, "doctor", "--textfile", str(textfile))
    _assert_one_root_line(doctor, locked)
    assert not textfile.exists()
    for args in (["apply", "--no-gate"], ["remove"], ["validate", locked]):
        done = _as_nobody(python, root, *args)
        assert done.returncode == 1 and "needs root" in done.stdout + done.stderr, done
        assert "Traceback" not in done.stderr
    assert tree_state(root) == before


# --- fix commands keep --root and --config ---------------------------------------------------

SUBCOMMAND = re.compile(
    r"spegel-node (?:apply|remove|validate|doctor|helm-values|install-units|configure-containerd)"
    r"\b[^`\n]*"
)


def test_fix_commands_keep_root_config_and_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "node"
    make_containerd(root)  # config_path unset, no state, no units, Spegel not answering
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg/c.toml").write_text('node_ip = "127.0.0.1"\nhost_port = 9\n')
    monkeypatch.chdir(tmp_path)
    result = run_cli(capsys, "doctor", "--root", str(root), "--config", "cfg/c.toml", "-o", "json")
    assert result.code == 1, result.err
    fixes = "\n".join(c.get("remediation") or "" for c in json.loads(result.out)["checks"])
    commands = SUBCOMMAND.findall(fixes)
    verbs = {c.split()[1] for c in commands}
    assert {"apply", "configure-containerd", "install-units"} <= verbs, fixes
    for command in commands:
        assert f"--root {root}" in command, command
        assert f"--config {tmp_path / 'cfg/c.toml'}" in command, command  # made absolute
    assert "spegel-node apply --root" in fixes


def test_cli_command_repeats_overrides_once(tmp_path: Path) -> None:
    from spegel_node.doctor.facts import Facts
    from spegel_node.doctor.remedy import cli_command, config_file, install_units_command
    from spegel_node.node import Node
    from spegel_node.settings import settings_from_mapping

    facts = Facts(
        Node(tmp_path),
        settings_from_mapping({}),
        command_options=[("--config", "/x/my config.toml"), ("--hosts-dir", "/opt/hosts")],
    )
    tail = f"--root {tmp_path} --config '/x/my config.toml'"
    assert cli_command(facts, "apply") == f"spegel-node apply {tail} --hosts-dir /opt/hosts"
    assert (
        cli_command(facts, "remove --hosts-dir /old")
        == f"spegel-node remove --hosts-dir /old {tail}"
    )
    assert install_units_command(facts).startswith(f"sudo spegel-node install-units {tail}")
    assert config_file(facts) == "/x/my config.toml"
    plain = Facts(Node(Path("/")), settings_from_mapping({}))
    assert cli_command(plain, "apply") == "spegel-node apply"
    assert config_file(plain) == "/etc/spegel-node/config.toml"


# --- {node_ip} in extra_mirrors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "ipv4", "ipv6"),
    [
        ("http://{node_ip}:30021", "http://10.1.2.3:30021", "http://[fd00::5]:30021"),
        ("http://[{node_ip}]:30021", "http://10.1.2.3:30021", "http://[fd00::5]:30021"),
        ("https://{node_ip}", "https://10.1.2.3", "https://[fd00::5]"),
        ("http://mirror.example:5000", "http://mirror.example:5000", "http://mirror.example:5000"),
    ],
)
def test_node_ip_placeholder_is_filled_in_per_node(raw: str, ipv4: str, ipv6: str) -> None:
    from spegel_node.settings import settings_from_mapping

    settings = settings_from_mapping({"extra_mirrors": [raw], "host_port": 30020})
    assert settings.mirror_urls("10.1.2.3") == ("http://10.1.2.3:30020", ipv4)
    assert settings.mirror_urls("fd00::5") == ("http://[fd00::5]:30020", ipv6)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("http://NODE_IP:30021", "write the node's address as {node_ip}"),
        ("http://x{node_ip}:30021", "{node_ip} must be the whole host"),
        ("http://{node_ip}:{node_ip}", "port must be a number"),
        ("http://{node_ip}:30021/v2", "must not have a path"),
    ],
)
def test_bad_placeholder_is_one_line_exit_2(
    raw: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "node"
    make_containerd(root, config_path="/etc/containerd/certs.d")
    config = tmp_path / "c.toml"
    config.write_text(f'node_ip = "10.1.2.3"\nextra_mirrors = ["{raw}"]\n')
    before = tree_state(root)
    result = run_cli(capsys, "apply", "--no-gate", "--root", str(root), "--config", str(config))
    assert result.code == 2
    assert result.err.count("\n") == 1 and says in result.err, result.err
    assert raw in result.err
    assert "spegel-node.invalid" not in result.err
    assert tree_state(root) == before


def test_apply_writes_the_filled_in_mirror(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "node"
    make_containerd(root, config_path="/etc/containerd/certs.d")
    config = tmp_path / "c.toml"
    config.write_text(
        'registries = ["https://docker.io"]\nnode_ip = "fd00::5"\n'
        'extra_mirrors = ["http://{node_ip}:30021"]\n'
    )
    common = ["--root", str(root), "--config", str(config)]
    result = run_cli(capsys, "apply", "--no-gate", *common)
    assert result.code == 0, result.err
    text = (root / "etc/containerd/certs.d/docker.io/hosts.toml").read_text()
    first = text.index('[host."http://[fd00::5]:29999"]')
    assert text.index('[host."http://[fd00::5]:30021"]') > first
    assert "{node_ip}" not in text
    # 2.x reads the IPv6 header form; 1.x drops it (apply refuses there: test_containerd_matrix)
    validate = run_cli(capsys, "validate", "--strict", "--containerd-version", "2.3.7", *common)
    assert validate.code == 0, validate.out
    again = run_cli(capsys, "apply", "--no-gate", *common, "-o", "json")
    data = json.loads(again.out)
    assert again.code == 0 and data["changes"] == [], again.out
    assert data["mirrors"] == ["http://[fd00::5]:29999", "http://[fd00::5]:30021"]
    values = run_cli(capsys, "helm-values", *common, "-o", "json")
    assert json.loads(values.out)["spegel"]["additionalMirrorTargets"] == [
        "http://$(NODE_IP):30021"
    ]


# --- "nothing to do" is exit 0 ---------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["k3s", "rke2", "microk8s"])
def test_configure_containerd_with_nothing_to_configure_is_exit_0(
    flavor: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    BUILDERS[flavor](tmp_path)
    before = tree_state(tmp_path)
    result = run_cli(capsys, "configure-containerd", "--root", str(tmp_path), "-o", "json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["changed"] is False and data["restart_required"] is False  # the role's changed_when
    assert data["nothing_to_do"] is True and data["flavor"] == flavor
    assert "already sets config_path" in data["notes"][0]
    text = run_cli(capsys, "configure-containerd", "--root", str(tmp_path))
    assert text.code == 0 and "nothing to configure" in text.out and text.err == ""
    assert tree_state(tmp_path) == before


def test_configure_containerd_still_refuses_what_it_must_not_edit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    BUILDERS["talos"](tmp_path)
    result = run_cli(capsys, "configure-containerd", "--root", str(tmp_path))
    assert result.code == 1 and "machine config" in result.err


def test_helm_values_without_a_layout_is_exit_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("host_port = 30020\n")
    (tmp_path / "node").mkdir()
    result = run_cli(
        capsys,
        "helm-values",
        "--root",
        str(tmp_path / "node"),
        "--config",
        str(config),
        "-o",
        "json",
    )
    assert result.code == 0
    spegel = json.loads(result.out)["spegel"]
    assert spegel["containerdSock"] == "/run/containerd/containerd.sock"
    assert spegel["containerdRegistryConfigPath"] == "/etc/containerd/certs.d"
    assert spegel["containerdContentPath"].endswith("io.containerd.content.v1.content")
    assert json.loads(result.out)["service"]["registry"]["hostPort"] == 30020
    assert result.err.count("\n") == 1 and "no containerd found" in result.err
    assert "default paths" in result.err
    bad = tmp_path / "bad.toml"
    bad.write_text("host_port = 0\n")
    assert run_cli(capsys, "helm-values", "--root", str(tmp_path), "--config", str(bad)).code == 2


# --- apply warns about the dirs k3s/RKE2 regenerate --------------------------------------------

CERTS = "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"


def test_apply_warns_about_dirs_k3s_regenerates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    BUILDERS["k3s"](tmp_path)  # registries.yaml names docker.io (not Spegel)
    config = tmp_path / "c.toml"
    config.write_text(
        'registries = ["https://docker.io", "https://ghcr.io"]\nnode_ip = "10.9.8.7"\n'
    )
    common = ["--root", str(tmp_path / ""), "--config", str(config), "--no-gate"]
    dry = run_cli(capsys, "apply", "--dry-run", *common)
    result = run_cli(capsys, "apply", *common)
    for run in (dry, result):
        assert run.code == 0, run.err
        lines = [ln for ln in run.err.splitlines() if "regenerates" in ln]
        assert lines == [
            f"warning: k3s regenerates {CERTS}/docker.io from /etc/rancher/k3s/registries.yaml at "
            "every start, dropping the Spegel mirror: name Spegel first there or keep the repair "
            "units on (`spegel-node doctor`, check k3s.registries_yaml, shows how)"
        ], run.err
    assert "ghcr.io" not in result.err  # k3s does not touch a dir registries.yaml does not name
    again = run_cli(capsys, "apply", *common, "-o", "json")  # nothing written: nothing to warn
    assert again.code == 0 and json.loads(again.out)["warnings"] == []
    (tmp_path / CERTS.lstrip("/") / "docker.io/hosts.toml").write_text(
        RANCHER_GENERATED.format(distro="k3s")  # k3s restarted
    )
    repaired = run_cli(capsys, "apply", *common, "-o", "json")
    assert repaired.code == 0
    warnings = json.loads(repaired.out)["warnings"]
    assert len(warnings) == 1 and f"{CERTS}/docker.io from" in warnings[0]


def test_no_warning_when_registries_yaml_names_spegel_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    BUILDERS["k3s"](tmp_path)
    (tmp_path / "etc/rancher/k3s/registries.yaml").write_text(
        'mirrors:\n  docker.io:\n    endpoint:\n      - "http://10.9.8.7:29999"\n'
    )
    config = tmp_path / "c.toml"
    config.write_text('registries = ["https://docker.io"]\nnode_ip = "10.9.8.7"\n')
    result = run_cli(
        capsys, "apply", "--no-gate", "--root", str(tmp_path), "--config", str(config), "-o", "json"
    )
    assert result.code == 0
    assert json.loads(result.out)["changes"]
    assert not [w for w in json.loads(result.out)["warnings"] if "regenerates" in w]


def test_doctor_says_once_when_only_the_socket_is_root_only(open_tmp: Path) -> None:
    import socket

    python = _nobody_python()
    root = open_tmp / "node"
    make_containerd(root, config_path="/etc/containerd/certs.d", with_socket=False)
    sock_path = root / "run/containerd/containerd.sock"
    sock_path.parent.mkdir(parents=True)
    for d in [root, *root.rglob("*")]:
        d.chmod(d.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if d.is_dir() else 0))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(sock_path))
        server.listen(1)
        sock_path.chmod(0o600)  # containerd's socket: root only
        doctor = _as_nobody(python, root, "doctor")
    _assert_one_root_line(doctor, "permission denied on /run/containerd/containerd.sock")

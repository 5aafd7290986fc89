"""install-units on fake node trees: rendering per flavor, watch lists, idempotence, systemd's checks.

The proof on real systemd (timer, path unit, gate) is in test_systemd_nodes.py.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import Result, run_cli, tree_state
from support.fake_nodes import BUILDERS, make_containerd, make_k3s, write

from spegel_node.units import (
    DOCTOR_SERVICE,
    DOCTOR_TIMER,
    DOCTOR_UNIT_NAMES,
    PATH,
    RUN_SERVICE,
    SERVICE,
    TIMER,
    UNIT_NAMES,
)

REPO = Path(__file__).resolve().parents[1]
EXEC = "/opt/spegel-node/bin/spegel-node"
UNIT_DIR = "etc/systemd/system"
CONTAINERD_HOSTS = "/etc/containerd/certs.d"
# The hosts dir apply writes on each flavor (REFERENCE section 3; containerd 2.2's default
# config_path entry where the flavor has none).
HOSTS_DIRS = {
    "k3s": "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
    "rke2": "/var/lib/rancher/rke2/agent/etc/containerd/certs.d",
    "k0s": CONTAINERD_HOSTS,
    "microk8s": "/var/snap/microk8s/current/args/certs.d",
    "kind": CONTAINERD_HOSTS,
    "eks": CONTAINERD_HOSTS,
    "containerd": CONTAINERD_HOSTS,
}
DEFAULT_REGISTRY_DIRS = ("docker.io", "ghcr.io", "quay.io", "gcr.io", "registry.k8s.io")


def install(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> Result:
    return run_cli(capsys, "install-units", "--root", str(root), *args)


def install_json(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> dict[str, object]:
    result = install(capsys, root, "--exec", EXEC, "--output", "json", *args)
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert isinstance(data, dict)
    return data


def directives(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def set_config(root: Path, text: str) -> None:
    write(root, "/etc/spegel-node/config.toml", text)


@pytest.mark.parametrize("flavor", sorted(HOSTS_DIRS))
def test_units_carry_each_flavors_hosts_dir(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flavor: str
) -> None:
    BUILDERS[flavor](tmp_path)
    hosts = HOSTS_DIRS[flavor]
    data = install_json(capsys, tmp_path)
    assert data["unit_dir"] == "/etc/systemd/system"
    assert data["changed"] == list(UNIT_NAMES)
    assert data["hosts_dir"] == hosts
    units = data["units"]
    assert isinstance(units, dict) and sorted(units) == sorted(UNIT_NAMES)
    for name, text in units.items():
        path = tmp_path / UNIT_DIR / name
        assert path.read_text() == text
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    service = units[SERVICE]
    assert directives(service, "ExecStart") == [f"{EXEC} apply --hosts-dir {hosts}"]
    assert directives(service, "ReadWritePaths") == [f"-{hosts} /var/lib/spegel-node"]
    assert directives(service, "ProtectSystem") == ["strict"]
    assert directives(units[PATH], "PathChanged") == [
        hosts,
        *(f"{hosts}/{name}/hosts.toml" for name in DEFAULT_REGISTRY_DIRS),
    ]
    assert directives(units[PATH], "Unit") == [SERVICE]
    assert (tmp_path / hosts.lstrip("/")).is_dir()  # the service may only write inside it


@pytest.mark.parametrize("flavor", ["talos", "bottlerocket"])
def test_distro_owned_hosts_dirs_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flavor: str
) -> None:
    BUILDERS[flavor](tmp_path)
    result = install(capsys, tmp_path, "--exec", EXEC)
    assert result.code == 1
    assert f"{flavor} owns its hosts dir" in result.err
    assert not (tmp_path / UNIT_DIR).exists()


def test_every_dir_containerd_may_read_is_watched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_containerd(tmp_path, config_path=CONTAINERD_HOSTS)
    set_config(tmp_path, 'registries = ["http://127.0.0.1:5000", "https://ghcr.io"]\n')
    before = install_json(capsys, tmp_path)
    hosts = CONTAINERD_HOSTS
    expected = [
        hosts,
        f"{hosts}/127.0.0.1_5000_/hosts.toml",  # containerd tries host_port_ first
        f"{hosts}/127.0.0.1:5000/hosts.toml",
        f"{hosts}/ghcr.io/hosts.toml",
    ]
    assert before["watch"] == expected
    assert directives(before["units"][PATH], "PathChanged") == expected  # type: ignore[index]
    # An existing host_port_ dir (Talos style) changes where apply writes, not the watch list.
    (tmp_path / hosts.lstrip("/") / "127.0.0.1_5000_").mkdir()
    after = install_json(capsys, tmp_path)
    assert after["watch"] == expected
    assert after["changed"] == []


def test_default_mode_watches_default_and_every_existing_registry_dir(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_k3s(tmp_path)  # k3s generated docker.io/hosts.toml
    hosts = HOSTS_DIRS["k3s"]
    (tmp_path / hosts.lstrip("/") / "quay.io").mkdir()
    (tmp_path / hosts.lstrip("/") / "_backup").mkdir()  # Spegel's backup dir: not a registry
    set_config(tmp_path, "registries = []\n")
    data = install_json(capsys, tmp_path)
    assert data["watch"] == [
        hosts,
        f"{hosts}/_default/hosts.toml",
        f"{hosts}/docker.io/hosts.toml",
        f"{hosts}/quay.io/hosts.toml",
    ]


def test_a_dir_that_is_no_registry_name_is_neither_managed_nor_watched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # `_default` mode manages only dirs named like a registry (docs/apply.md), so a dir systemd
    # could not name literally (`%` is its specifier) is not one apply writes: nothing to watch.
    make_containerd(tmp_path, config_path=CONTAINERD_HOSTS)
    set_config(tmp_path, "registries = []\n")
    (tmp_path / CONTAINERD_HOSTS.lstrip("/") / "odd dir%").mkdir(parents=True)
    result = install(capsys, tmp_path, "--exec", EXEC, "--output", "json")
    assert result.code == 0
    assert "odd dir%" not in json.loads(result.out)["units"][PATH]
    assert "odd dir%" not in result.err
    assert run_cli(capsys, "apply", "--no-gate", "--root", str(tmp_path)).code == 0
    assert not (tmp_path / CONTAINERD_HOSTS.lstrip("/") / "odd dir%" / "hosts.toml").exists()


def test_second_run_writes_nothing_and_a_registry_change_rewrites_only_the_path_unit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_containerd(tmp_path, config_path=CONTAINERD_HOSTS)
    first = install(capsys, tmp_path, "--exec", EXEC)
    assert first.code == 0, first.err
    assert "create /etc/systemd/system/spegel-node-repair.path" in first.out
    assert "systemctl daemon-reload && systemctl enable --now" in first.out
    units = tmp_path / UNIT_DIR
    before = tree_state(units)

    again = install(capsys, tmp_path, "--exec", EXEC)
    assert again.code == 0
    assert "units up to date" in again.out
    assert "systemctl" not in again.out
    assert tree_state(units) == before  # same content, same mtimes

    set_config(tmp_path, 'registries = ["https://ghcr.io"]\n')
    changed = install_json(capsys, tmp_path)
    assert changed["changed"] == [PATH]
    after = tree_state(units)
    assert after[SERVICE] == before[SERVICE]
    assert after[TIMER] == before[TIMER]
    assert after[PATH] != before[PATH]


def test_dry_run_writes_nothing_and_prints_a_diff(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_containerd(tmp_path)
    before = tree_state(tmp_path)
    result = install(capsys, tmp_path, "--exec", EXEC, "--dry-run")
    assert result.code == 0, result.err
    assert "would create /etc/systemd/system/spegel-node-repair.timer" in result.out
    assert "+PathChanged=/etc/containerd/certs.d/ghcr.io/hosts.toml" in result.out
    assert "+OnUnitActiveSec=1min" in result.out
    assert tree_state(tmp_path) == before
    as_json = install(capsys, tmp_path, "--exec", EXEC, "--dry-run", "--output", "json")
    assert json.loads(as_json.out)["dry_run"] is True
    assert tree_state(tmp_path) == before


def test_explicit_unit_dir_and_config_are_used(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = tmp_path / "node"
    make_containerd(root, config_path=CONTAINERD_HOSTS)
    config = write(root, "/etc/spegel-node/fleet.toml", 'registries = ["https://quay.io"]\n')
    out = tmp_path / "rendered"
    data = install_json(capsys, root, "--unit-dir", str(out), "--config", str(config))
    assert data["unit_dir"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(UNIT_NAMES)
    assert not (root / UNIT_DIR).exists()
    service = (out / SERVICE).read_text()
    assert directives(service, "ExecStart") == [
        f"{EXEC} apply --hosts-dir {CONTAINERD_HOSTS} --config /etc/spegel-node/fleet.toml"
    ]


def test_default_exec_is_the_running_installation(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_containerd(tmp_path)
    result = install(capsys, tmp_path, "--output", "json")
    assert result.code == 0, result.err
    exec_path = json.loads(result.out)["exec"]
    assert exec_path == str(Path(sys.executable).parent / "spegel-node")
    assert "--exec not given" in result.err  # a --root that is not / gets a warning


@pytest.mark.parametrize(
    "args",
    [
        ("--exec", "spegel-node"),  # not absolute
        ("--exec", "/opt/spegel node/bin/spegel-node"),
        ("--exec", "/opt/%n/spegel-node"),  # a systemd specifier
        ("--exec", EXEC, "--hosts-dir", "/etc/containerd/certs d"),
    ],
)
def test_paths_systemd_would_misread_are_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...]
) -> None:
    make_containerd(tmp_path)
    result = install(capsys, tmp_path, *args)
    assert result.code == 2
    assert "cannot be written into a systemd unit" in result.err
    assert not (tmp_path / UNIT_DIR).exists()


def test_an_unwritable_unit_dir_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    make_containerd(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = install(capsys, tmp_path, "--exec", EXEC, "--unit-dir", str(blocker))
    assert result.code == 1
    assert result.err.startswith("spegel-node: error: cannot read the units in")
    assert "Traceback" not in result.err


def test_committed_units_are_the_plain_containerd_rendering(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """systemd/ in the repository is `install-units --unit-dir systemd` on plain containerd."""
    make_containerd(tmp_path / "node")
    out = tmp_path / "rendered"
    result = install(capsys, tmp_path / "node", "--exec", EXEC, "--unit-dir", str(out))
    assert result.code == 0, result.err
    committed = REPO / "systemd"
    assert sorted(p.name for p in committed.iterdir()) == sorted(UNIT_NAMES)
    for name in UNIT_NAMES:
        assert (committed / name).read_text() == (out / name).read_text(), (
            f"systemd/{name} is stale: regenerate it with `spegel-node install-units --root "
            f"NODE --exec {EXEC} --unit-dir systemd` on a plain containerd tree"
        )


# --- systemd's own checks ------------------------------------------------------------------------

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package: systemd)",
)


def render_units(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> Path:
    """The units install-units writes for plain containerd with `args`, into tmp_path/units,
    with ExecStart= the real spegel-node of this venv."""
    make_containerd(tmp_path / "node", config_path=CONTAINERD_HOSTS)
    real_exec = Path(sys.executable).parent / "spegel-node"
    assert real_exec.is_file()
    out = tmp_path / "units"
    result = install(
        capsys, tmp_path / "node", "--exec", str(real_exec), "--unit-dir", str(out), *args
    )
    assert result.code == 0, result.err
    return out


def assert_verify_clean(*units: Path) -> None:
    """`systemd-analyze verify` passes and says nothing about spegel-node."""
    proc = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "spegel-node" in line]
    assert ours == []


def exposure_of(unit: Path) -> float:
    """`systemd-analyze security --offline`'s overall exposure level of `unit`."""
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match[1])


@pytest.fixture
def rendered(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Path:
    return render_units(capsys, tmp_path)


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(rendered: Path) -> None:
    assert_verify_clean(*(rendered / n for n in UNIT_NAMES))


@needs_systemd_analyze
def test_service_exposure_is_at_most_3(
    rendered: Path, record_property: pytest.RecordProperty
) -> None:
    exposure = exposure_of(rendered / SERVICE)
    record_property("exposure", exposure)
    print(f"systemd-analyze security: {SERVICE} exposure {exposure}")
    assert exposure <= 3.0


# --- --mode service: one long-running `run` -------------------------------------------------------


@pytest.fixture
def rendered_service(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Path:
    return render_units(capsys, tmp_path, "--mode", "service")


def test_service_mode_writes_one_hardened_notify_unit(rendered_service: Path) -> None:
    assert sorted(p.name for p in rendered_service.iterdir()) == [RUN_SERVICE]
    text = (rendered_service / RUN_SERVICE).read_text()
    assert directives(text, "Type") == ["notify"]
    assert directives(text, "ExecStart")[0].split()[1:3] == ["run", "--hosts-dir"]
    assert directives(text, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert directives(text, "Restart") == ["on-failure"]
    assert directives(text, "ProtectSystem") == ["strict"]
    assert directives(text, "NoNewPrivileges") == ["yes"]
    assert directives(text, "WantedBy") == ["multi-user.target"]


@needs_systemd_analyze
def test_service_mode_verify_is_clean_and_exposure_at_most_3(rendered_service: Path) -> None:
    assert_verify_clean(rendered_service / RUN_SERVICE)
    assert exposure_of(rendered_service / RUN_SERVICE) <= 3.0


# --- --textfile: doctor every minute, for node_exporter's textfile collector ----------------------

TEXTFILE = "/var/lib/node_exporter/textfile/spegel_node.prom"


def test_textfile_adds_a_doctor_timer_and_a_read_only_service(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_k3s(tmp_path)
    (tmp_path / "var/lib/node_exporter/textfile").mkdir(parents=True)
    hosts = HOSTS_DIRS["k3s"]
    data = install_json(capsys, tmp_path, "--textfile", TEXTFILE)
    assert data["changed"] == [*UNIT_NAMES, *DOCTOR_UNIT_NAMES]
    assert data["textfile"] == TEXTFILE
    units = data["units"]
    assert isinstance(units, dict)
    for name in DOCTOR_UNIT_NAMES:
        assert (tmp_path / UNIT_DIR / name).read_text() == units[name]
    service = units[DOCTOR_SERVICE]
    assert directives(service, "ExecStart") == [
        f"{EXEC} doctor --hosts-dir {hosts} --textfile {TEXTFILE}"
    ]
    # read-only but the textfile's directory: not the hosts dir, not the state dir
    assert directives(service, "ReadWritePaths") == ["-/var/lib/node_exporter/textfile"]
    assert directives(service, "ProtectSystem") == ["strict"]
    assert directives(service, "StateDirectory") == []
    assert directives(service, "SuccessExitStatus") == ["1"]  # a failed check is in the textfile
    timer = units[DOCTOR_TIMER]
    assert directives(timer, "OnUnitActiveSec") == ["1min"]
    assert directives(timer, "Unit") == [DOCTOR_SERVICE]
    assert directives(timer, "WantedBy") == ["timers.target"]
    assert not [w for w in data["warnings"] if "textfile" in w]  # type: ignore[union-attr]


def test_textfile_hint_and_idempotence(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    make_containerd(tmp_path, config_path=CONTAINERD_HOSTS)
    first = install(capsys, tmp_path, "--exec", EXEC, "--textfile", TEXTFILE)
    assert first.code == 0, first.err
    assert f"enable --now {TIMER} {PATH} {DOCTOR_TIMER}" in first.out
    assert "textfile does not exist on the node" in first.err  # the dir is not created
    before = tree_state(tmp_path / UNIT_DIR)
    again = install(capsys, tmp_path, "--exec", EXEC, "--textfile", TEXTFILE)
    assert "units up to date" in again.out
    assert tree_state(tmp_path / UNIT_DIR) == before
    # without --textfile the doctor units are not rendered (nor removed)
    plain = install_json(capsys, tmp_path)
    assert sorted(plain["units"]) == sorted(UNIT_NAMES)  # type: ignore[arg-type]
    assert plain["textfile"] is None


def test_textfile_with_config_and_service_mode(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_containerd(tmp_path, config_path=CONTAINERD_HOSTS)
    config = write(tmp_path, "/etc/spegel-node/fleet.toml", 'registries = ["https://quay.io"]\n')
    data = install_json(
        capsys, tmp_path, "--mode", "service", "--config", str(config), "--textfile", TEXTFILE
    )
    units = data["units"]
    assert isinstance(units, dict)
    assert sorted(units) == sorted([RUN_SERVICE, *DOCTOR_UNIT_NAMES])
    assert directives(units[DOCTOR_SERVICE], "ExecStart") == [
        f"{EXEC} doctor --hosts-dir {CONTAINERD_HOSTS} --config /etc/spegel-node/fleet.toml "
        f"--textfile {TEXTFILE}"
    ]


@pytest.mark.parametrize(
    "textfile",
    ["spegel_node.prom", "/var/lib/textfile/spegel node.prom", "/var/lib/x/spegel.txt", "/x.prom"],
)
def test_bad_textfile_paths_are_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, textfile: str
) -> None:
    make_containerd(tmp_path)
    result = install(capsys, tmp_path, "--exec", EXEC, "--textfile", textfile)
    assert result.code == 2, result.err
    assert "--textfile" in result.err
    assert not (tmp_path / UNIT_DIR).exists()


@pytest.fixture
def rendered_doctor(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Path:
    return render_units(capsys, tmp_path, "--textfile", TEXTFILE)


@needs_systemd_analyze
def test_doctor_units_verify_clean_and_exposure_at_most_3(rendered_doctor: Path) -> None:
    assert_verify_clean(*(rendered_doctor / n for n in DOCTOR_UNIT_NAMES))
    assert exposure_of(rendered_doctor / DOCTOR_UNIT_NAMES[0]) <= 3.0

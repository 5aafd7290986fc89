"""configure-containerd: config_path and discard_unpacked_layers = false, in the right file.

Fake node trees (tests/support/fake_nodes.py) for every flavor, and a real containerd 1.6.20
(Debian's) for the proof: `containerd config dump` (containerd's own loader, imports merged)
and a daemon started on the written config, whose CRI plugin logs the settings it runs with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from support import fake_nodes
from support.cli import Result, run_cli, tree_state

from spegel_node.containerd_setup import (
    MANAGED_HEADER,
    Placement,
    UnsafeEdit,
    edit_config_text,
    placements,
    process_start_time,
)

CRI = 'plugins."io.containerd.grpc.v1.cri"'
IMAGES = 'plugins."io.containerd.cri.v1.images"'
HOSTS = "/etc/containerd/certs.d"

# /etc/containerd/config.toml as Debian 12's containerd 1.6.20 package ships it (the nspawn
# nodes' base image has exactly this file).
DEBIAN_CONFIG = """\
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""


def configure(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> Result:
    return run_cli(capsys, "configure-containerd", "--root", str(root), *args)


def configure_json(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> dict[str, object]:
    result = configure(capsys, root, "--output", "json", *args)
    assert result.code == 0, result.err
    data: dict[str, object] = json.loads(result.out)
    return data


def debian_node(root: Path, config: str = DEBIAN_CONFIG) -> Path:
    fake_nodes.make_containerd(root, write_config=False)
    return fake_nodes.write(root, "/etc/containerd/config.toml", config)


def toml(path: Path) -> dict[str, object]:
    return tomllib.loads(path.read_text())


def cri_values(data: dict[str, object], version: int = 2) -> tuple[object, object]:
    plugins = data["plugins"]
    assert isinstance(plugins, dict)
    if version == 3:
        images = plugins["io.containerd.cri.v1.images"]
        return images["registry"]["config_path"], images["discard_unpacked_layers"]
    cri = plugins["cri" if version == 1 else "io.containerd.grpc.v1.cri"]
    return cri["registry"]["config_path"], cri["containerd"]["discard_unpacked_layers"]


# --- plain containerd ----------------------------------------------------------------------------


def test_debian_config_gets_both_tables_and_keeps_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = debian_node(tmp_path)
    data = configure_json(capsys, tmp_path)
    assert data["changed"] is True
    assert data["restart_required"] is True
    assert data["path"] == "/etc/containerd/config.toml"
    assert data["flavor"] == "containerd"
    assert data["version"] == 2
    assert data["config_path"] == HOSTS
    assert data["service"] == "containerd.service"
    text = config.read_text()
    assert text.startswith(DEBIAN_CONFIG)  # the original bytes, untouched, then the tables
    parsed = toml(config)
    assert cri_values(parsed) == (HOSTS, False)
    assert parsed["plugins"]["io.containerd.grpc.v1.cri"]["cni"]["bin_dir"] == "/usr/lib/cni"
    assert parsed["plugins"]["io.containerd.internal.v1.opt"]["path"] == "/var/lib/containerd/opt"


def test_second_run_writes_nothing_and_needs_no_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    debian_node(tmp_path)
    configure_json(capsys, tmp_path)
    before = tree_state(tmp_path)
    time.sleep(0.01)
    data = configure_json(capsys, tmp_path)
    assert data["changed"] is False
    assert data["restart_required"] is False  # not a live root: no process to compare with
    assert data["diff"] == ""
    assert tree_state(tmp_path) == before
    text = configure(capsys, tmp_path)
    assert text.code == 0
    assert "nothing to change" in text.out


def test_dry_run_prints_a_diff_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    debian_node(tmp_path)
    before = tree_state(tmp_path)
    result = configure(capsys, tmp_path, "--dry-run")
    assert result.code == 0, result.err
    assert "would write /etc/containerd/config.toml" in result.out
    assert f'+  config_path = "{HOSTS}"' in result.out
    assert "+  discard_unpacked_layers = false" in result.out
    assert "restart containerd" in result.out
    assert tree_state(tmp_path) == before
    data = configure_json(capsys, tmp_path, "--dry-run")
    assert data["changed"] is True and data["dry_run"] is True
    assert tree_state(tmp_path) == before


def test_containerd_config_default_is_edited_in_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`containerd config default` has config_path = "": only that line changes."""
    fake_nodes.make_containerd(tmp_path)
    config = tmp_path / "etc/containerd/config.toml"
    old = config.read_text()
    data = configure_json(capsys, tmp_path)
    assert data["changed"] is True
    new = config.read_text()
    changed = [(a, b) for a, b in zip(old.splitlines(), new.splitlines(), strict=True) if a != b]
    assert changed == [('      config_path = ""', f'      config_path = "{HOSTS}"')]
    expected = tomllib.loads(old)
    expected["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] = HOSTS
    assert tomllib.loads(new) == expected


def test_missing_config_is_created_as_version_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nodes.make_containerd(tmp_path, write_config=False)
    data = configure_json(capsys, tmp_path)
    config = tmp_path / "etc/containerd/config.toml"
    assert data["changed"] is True and data["path"] == "/etc/containerd/config.toml"
    text = config.read_text()
    assert text.startswith(MANAGED_HEADER)
    assert toml(config)["version"] == 2
    assert cri_values(toml(config)) == (HOSTS, False)
    assert config.stat().st_mode & 0o777 == 0o644
    assert any("did not exist" in n for n in data["notes"])  # type: ignore[union-attr]
    assert configure_json(capsys, tmp_path)["changed"] is False


def test_discard_true_becomes_false_and_file_mode_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = debian_node(
        tmp_path,
        f"version = 2\n\n[{CRI}.containerd]\n  discard_unpacked_layers = true\n"
        f'  snapshotter = "overlayfs"\n',
    )
    config.chmod(0o600)
    configure_json(capsys, tmp_path)
    assert cri_values(toml(config)) == (HOSTS, False)
    assert toml(config)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == (
        "overlayfs"
    )
    assert config.stat().st_mode & 0o777 == 0o600


def test_existing_config_path_is_kept_when_it_covers_the_hosts_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nodes.make_containerd_custom(tmp_path)  # config_path = /opt/registry-hosts:/etc/docker/...
    data = configure_json(capsys, tmp_path)
    assert data["config_path"] == fake_nodes.CUSTOM_CONFIG_PATH
    assert data["changed"] is False  # discard_unpacked_layers is already false there


def test_hosts_dir_outside_config_path_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nodes.make_containerd_custom(tmp_path)
    before = tree_state(tmp_path)
    result = configure(capsys, tmp_path, "--hosts-dir", "/srv/hosts")
    assert result.code == 1
    assert "does not include the hosts dir /srv/hosts" in result.err
    assert tree_state(tmp_path) == before


def test_registry_mirrors_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    debian_node(
        tmp_path,
        f'version = 2\n[{CRI}.registry.mirrors."docker.io"]\n  endpoint = ["https://m.example"]\n',
    )
    before = tree_state(tmp_path)
    result = configure(capsys, tmp_path)
    assert result.code == 1
    assert "registry.mirrors" in result.err and "config_path" in result.err
    assert tree_state(tmp_path) == before


def test_invalid_toml_is_an_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    debian_node(tmp_path, "version = 2\n[plugins\n")
    before = tree_state(tmp_path)
    result = configure(capsys, tmp_path)
    assert result.code == 1
    assert "not valid TOML" in result.err
    assert "Traceback" not in result.err
    assert tree_state(tmp_path) == before


def test_missing_named_import_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    debian_node(tmp_path, 'version = 2\nimports = ["/etc/containerd/gone.toml"]\n')
    result = configure(capsys, tmp_path)
    assert result.code == 1
    assert "/etc/containerd/gone.toml" in result.err and "would not start" in result.err


def test_symlinked_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = fake_nodes.write(tmp_path, "/etc/containerd/real.toml", DEBIAN_CONFIG)
    fake_nodes.make_containerd(tmp_path, write_config=False)
    (tmp_path / "etc/containerd/config.toml").symlink_to(real)
    result = configure(capsys, tmp_path)
    assert result.code == 1
    assert "symlink" in result.err
    assert real.read_text() == DEBIAN_CONFIG


# --- containerd 1.x imports replace the whole CRI table -----------------------------------------


def import_node(root: Path) -> tuple[Path, Path]:
    """Main file importing a drop-in that sets a CRI table (relative: containerd resolves it
    against the importing file's dir, so the same tree works for the real containerd)."""
    body = DEBIAN_CONFIG.removeprefix("version = 2\n")
    main = debian_node(root, f'version = 2\nimports = ["conf.d/10-cri.toml"]\n{body}')
    dropin = fake_nodes.write(
        root, "/etc/containerd/conf.d/10-cri.toml", f"[{CRI}]\n  enable_selinux = false\n"
    )
    return main, dropin


def test_on_version_2_the_last_file_with_a_cri_table_gets_the_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main, dropin = import_node(tmp_path)
    main_before = main.read_text()
    data = configure_json(capsys, tmp_path)
    assert data["path"] == "/etc/containerd/conf.d/10-cri.toml"
    assert any("replaces the table" in n for n in data["notes"])  # type: ignore[union-attr]
    assert main.read_text() == main_before
    assert cri_values(toml(dropin)) == (HOSTS, False)
    assert toml(dropin)["plugins"]["io.containerd.grpc.v1.cri"]["enable_selinux"] is False


def test_version_3_key_by_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = debian_node(
        tmp_path,
        f'version = 3\n\n[{IMAGES}]\n  snapshotter = "overlayfs"\n  discard_unpacked_layers = true\n',
    )
    data = configure_json(capsys, tmp_path)
    assert data["version"] == 3
    assert cri_values(toml(config), 3) == (HOSTS, False)
    assert toml(config)["plugins"]["io.containerd.cri.v1.images"]["snapshotter"] == "overlayfs"


def test_version_1_uses_the_short_plugin_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = debian_node(tmp_path, "[plugins.cri]\n  enable_selinux = false\n")
    configure_json(capsys, tmp_path)
    assert cri_values(toml(config), 1) == (HOSTS, False)


# --- other flavors -------------------------------------------------------------------------------


def test_k0s_gets_a_dropin_in_containerd_d(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nodes.make_k0s(tmp_path)
    main = tmp_path / "etc/k0s/containerd.toml"
    main_before = main.read_text()
    data = configure_json(capsys, tmp_path)
    assert data["flavor"] == "k0s"
    assert data["path"] == "/etc/k0s/containerd.d/spegel-node.toml"
    assert data["service"] == "k0sworker.service"
    assert data["version"] == 3  # as k0s's generated CRI file
    dropin = tmp_path / "etc/k0s/containerd.d/spegel-node.toml"
    assert dropin.read_text().startswith(MANAGED_HEADER)
    assert cri_values(toml(dropin), 3) == (HOSTS, False)
    assert main.read_text() == main_before
    # Once k0s merged it (here: the reader merges drop-ins as k0s does), nothing changes.
    again = configure_json(capsys, tmp_path)
    assert again["changed"] is False
    detect = run_cli(capsys, "detect", "--root", str(tmp_path), "--output", "json")
    assert json.loads(detect.out)["config"]["config_path"] == HOSTS


def test_k0s_keeps_a_config_path_another_dropin_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nodes.make_k0s(tmp_path, dropin_config_path="/etc/k0s/containerd.d/certs.d")
    data = configure_json(capsys, tmp_path)
    assert data["config_path"] == "/etc/k0s/containerd.d/certs.d"
    dropin = tmp_path / "etc/k0s/containerd.d/spegel-node.toml"
    assert cri_values(toml(dropin), 3) == ("/etc/k0s/containerd.d/certs.d", False)


def test_kind_is_edited_like_plain_containerd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nodes.make_kind(tmp_path, config_path=False)
    data = configure_json(capsys, tmp_path)
    assert data["flavor"] == "kind" and data["path"] == "/etc/containerd/config.toml"
    assert data["changed"] is True


@pytest.mark.parametrize(
    ("flavor", "says"),
    [
        ("talos", "20-customization.part"),
        ("bottlerocket", "apiclient set"),
        ("eks", "NodeConfig"),  # k3s, RKE2, MicroK8s: nothing to do (test_cli_edges.py)
    ],
)
def test_flavors_that_own_the_config_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flavor: str, says: str
) -> None:
    fake_nodes.BUILDERS[flavor](tmp_path)
    before = tree_state(tmp_path)
    result = configure(capsys, tmp_path, "--output", "json")
    assert result.code == 1, result.out
    assert says in result.err
    assert "Traceback" not in result.err
    assert tree_state(tmp_path) == before


# --- the editor ----------------------------------------------------------------------------------


def test_edit_dotted_keys(tmp_path: Path) -> None:
    text = f'version = 2\n{CRI}.registry.config_path = ""\n'
    out = edit_config_text(text, 2, placements(2, HOSTS))
    assert cri_values(tomllib.loads(out)) == (HOSTS, False)


def test_edit_indents_a_new_key_like_its_neighbours() -> None:
    text = f'version = 3\n\n[plugins]\n  [{IMAGES}]\n    snapshotter = "overlayfs"\n'
    out = edit_config_text(text, 3, placements(3, HOSTS))
    assert "    discard_unpacked_layers = false\n" in out
    assert cri_values(tomllib.loads(out), 3) == (HOSTS, False)


def test_edit_refuses_what_it_cannot_place_safely() -> None:
    text = 'version = 2\n[plugins]\n"io.containerd.grpc.v1.cri" = { registry = { x = 1 } }\n'
    try:
        out = edit_config_text(text, 2, placements(2, HOSTS))
    except UnsafeEdit as e:
        assert "add this by hand" in str(e)
    else:  # whatever it wrote must mean exactly the intended settings
        assert cri_values(tomllib.loads(out)) == (HOSTS, False)


def test_edit_leaves_a_right_file_byte_for_byte() -> None:
    text = f'version=2 # keep\n[{CRI}.registry]\nconfig_path="{HOSTS}"\n[{CRI}.containerd]\ndiscard_unpacked_layers=false\n'
    assert edit_config_text(text, 2, placements(2, HOSTS)) == text


def test_placements_per_version() -> None:
    assert placements(3, "/h")[1] == Placement(
        ("plugins", "io.containerd.cri.v1.images"), "discard_unpacked_layers", False
    )
    assert placements(1, "/h")[0].table == ("plugins", "cri", "registry")


# --- a real containerd ---------------------------------------------------------------------------

needs_containerd = pytest.mark.skipif(
    shutil.which("containerd") is None, reason="containerd not installed (make installs it)"
)


def config_dump(config: Path) -> str:
    proc = subprocess.run(
        ["containerd", "--config", str(config), "config", "dump"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return proc.stdout


def dumped_cri(dump: str) -> tuple[str, bool]:
    data = tomllib.loads(dump)
    cri = data["plugins"]["io.containerd.grpc.v1.cri"]
    return cri["registry"]["config_path"], cri["containerd"]["discard_unpacked_layers"]


@needs_containerd
@pytest.mark.sandbox
def test_real_containerd_config_dump_shows_the_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = debian_node(tmp_path)
    assert dumped_cri(config_dump(config))[0] == ""  # Debian's file: no config_path
    configure_json(capsys, tmp_path)
    assert dumped_cri(config_dump(config)) == (HOSTS, False)


@needs_containerd
@pytest.mark.sandbox
def test_real_containerd_merges_the_import_that_got_the_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """containerd 1.x drops a CRI table set before an import that sets one: the edit goes there."""
    main, dropin = import_node(tmp_path)
    # The 1.x semantics first: config_path set in the main file alone is lost.
    probe = main.with_name("probe.toml")
    probe.write_text(main.read_text() + f'\n[{CRI}.registry]\n  config_path = "/lost"\n')
    assert dumped_cri(config_dump(probe))[0] == ""
    probe.unlink()
    data = configure_json(capsys, tmp_path)
    assert data["path"] == "/etc/containerd/conf.d/10-cri.toml"
    assert dumped_cri(config_dump(main)) == (HOSTS, False)
    assert dropin.read_text().startswith(f"[{CRI}]\n  enable_selinux = false\n")


@needs_containerd
@pytest.mark.sandbox
def test_a_containerd_daemon_runs_with_the_written_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Start containerd on the file the command wrote; its CRI plugin logs the live settings."""
    run = tmp_path / "run"
    run.mkdir()
    config = debian_node(
        tmp_path / "node",
        f'version = 2\nroot = "{run}/root"\nstate = "{run}/state"\n\n[grpc]\n'
        f'  address = "{run}/containerd.sock"\n\n[{CRI}]\n  disable_apparmor = true\n'
        f"  [{CRI}.containerd]\n    discard_unpacked_layers = true\n",
    )
    data = configure_json(capsys, tmp_path / "node")
    assert data["changed"] is True
    log = run / "containerd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["containerd", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "Start cri plugin with config" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "containerd did not start its CRI plugin"
            time.sleep(0.05)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    line = next(
        ln for ln in log.read_text(errors="replace").splitlines() if "Start cri plugin" in ln
    )
    assert re.search(rf"ConfigPath:{re.escape(HOSTS)}[ }}]", line), line
    assert "DiscardUnpackedLayers:false" in line, line
    assert os.path.exists(config)


def test_process_start_time_is_precise_to_a_tick() -> None:
    """Not psutil's create_time, whose boot time has whole-second resolution."""
    before = time.time()
    child = subprocess.Popen(["sleep", "5"])
    try:
        started = process_start_time(child.pid)
    finally:
        child.kill()
        child.wait()
    after = time.time()
    assert started is not None
    assert before - 0.05 <= started <= after + 0.05
    assert process_start_time(2**22 + 12345) is None


SECRETS = ("s3cretPW-x", "dXNlcjpwYXNzd29yZA==", "idtok-12345", "hdrSecret-1", "Bearer tok-987")
CREDENTIALED = f"""version = 2

[plugins."io.containerd.grpc.v1.cri".registry]
  [plugins."io.containerd.grpc.v1.cri".registry.configs."reg.example.com".auth]
    username = "robot"
    password = "{SECRETS[0]}"
    auth = "{SECRETS[1]}"
    identitytoken = "{SECRETS[2]}"
  [plugins."io.containerd.grpc.v1.cri".registry.headers]
    X-Secret = ["{SECRETS[3]}"]
    Authorization = ["{SECRETS[4]}"]
"""


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("output", ["text", "json"])
def test_registry_credentials_in_containerd_config_never_reach_the_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dry_run: bool, output: str
) -> None:
    fake_nodes.make_containerd(tmp_path)
    config = tmp_path / "etc/containerd/config.toml"
    config.write_text(CREDENTIALED)
    args = ["configure-containerd", "--root", str(tmp_path), "-o", output]
    result = run_cli(capsys, *args, *(["--dry-run"] if dry_run else []))
    assert result.code == 0, result.err
    assert "config_path" in result.out  # the diff is there
    for secret in SECRETS:
        assert secret not in result.out + result.err
    if not dry_run:  # the file itself keeps them
        assert all(secret in config.read_text() for secret in SECRETS)

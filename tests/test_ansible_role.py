"""The Ansible role without nodes: layout, argument specs, lint, and the config it templates.

The role on real systemd nodes is tests/test_ansible_nspawn.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from spegel_node.node import Node
from spegel_node.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "ansible"
ROLE = ANSIBLE / "roles" / "spegel_node"
BIN = Path(sys.executable).parent
PHASES = ("preflight", "install", "configure", "units", "enable", "apply", "verify")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def ansible_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "ansible-home"
    home.mkdir(exist_ok=True)
    return {
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "LANG": "C.UTF-8",
    }


def need(tool: str) -> Path:
    path = BIN / tool
    if not path.exists():
        pytest.skip(f"{tool} not installed (make installs the dev extra)")
    return path


def test_standard_role_layout() -> None:
    for part in ("defaults", "tasks", "handlers", "templates", "meta", "vars"):
        assert (ROLE / part).is_dir(), part
    assert (ROLE / "meta" / "main.yml").is_file()
    assert (ROLE / "meta" / "argument_specs.yml").is_file()
    assert (ANSIBLE / "playbooks" / "rollout.yml").is_file()
    assert (ANSIBLE / "inventory.example.ini").is_file()


def test_main_only_imports_the_phases_in_order() -> None:
    main = load(ROLE / "tasks" / "main.yml")
    files = [task["ansible.builtin.import_tasks"] for task in main]
    assert files == [f"{phase}.yml" for phase in PHASES]
    for task in main:
        assert set(task) <= {"name", "ansible.builtin.import_tasks", "tags"}
        assert task["tags"]
    for phase in PHASES:
        assert (ROLE / "tasks" / f"{phase}.yml").is_file(), phase


def test_preflight_only_asserts() -> None:
    """Asserts, plus the read-only probes they judge (check_mode-safe, never changed)."""
    for task in load(ROLE / "tasks" / "preflight.yml"):
        modules = {k for k in task if k.startswith("ansible.")}
        assert modules <= {
            "ansible.builtin.assert",
            "ansible.builtin.command",
            "ansible.builtin.stat",
        }, task["name"]
        if "ansible.builtin.command" in modules:
            assert task["changed_when"] is False and task["check_mode"] is False
        if "ansible.builtin.assert" in modules:
            assert task["ansible.builtin.assert"]["fail_msg"], task["name"]


def test_argument_specs_mirror_defaults_one_for_one() -> None:
    defaults = load(ROLE / "defaults" / "main.yml")
    options = load(ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert list(options) == list(defaults)
    for name, spec in options.items():
        assert name.startswith("spegel_node_"), name
        assert spec["type"] in {"str", "int", "bool", "list", "path", "raw"}, name
        assert spec["description"], name
        assert spec["default"] == defaults[name], name
        if spec["type"] == "list":
            assert spec["elements"] == "str", name


def test_internal_variables_are_prefixed() -> None:
    for name in load(ROLE / "vars" / "main.yml"):
        assert name.startswith("_spegel_node_"), name


def test_the_issue_variables_exist() -> None:
    defaults = load(ROLE / "defaults" / "main.yml")
    assert defaults["spegel_node_host_port"] == 29999
    assert defaults["spegel_node_configure_containerd"] is False
    assert defaults["spegel_node_fail_on_doctor"] is True
    assert "default_ipv4" in defaults["spegel_node_node_ip"]
    for name in (
        "spegel_node_registries",
        "spegel_node_extra_mirrors",
        "spegel_node_wheelhouse",
        "spegel_node_venv",
        "spegel_node_resolve_tags",
        "spegel_node_dial_timeout",
        "spegel_node_gate_failures",
        "spegel_node_hosts_dir",
        "spegel_node_serial",
        "spegel_node_max_fail_percentage",
    ):
        assert name in defaults, name


def test_handler_listens_and_reloads() -> None:
    (handler,) = load(ROLE / "handlers" / "main.yml")
    assert handler["listen"] == "spegel_node restart containerd"
    assert handler["ansible.builtin.systemd_service"]["daemon_reload"] is True


def test_playbook_targets_spegel_nodes_with_rolling_serial() -> None:
    (play,) = load(ANSIBLE / "playbooks" / "rollout.yml")
    assert play["hosts"] == "spegel_nodes"
    assert "spegel_node_serial" in play["serial"]
    assert "spegel_node_max_fail_percentage" in play["max_fail_percentage"]
    assert play["roles"] == [{"role": "spegel_node"}]


def test_ansible_lint_production_profile(tmp_path: Path) -> None:
    lint = need("ansible-lint")
    proc = subprocess.run(
        [str(lint), "--profile", "production", "--nocolor"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env=ansible_env(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stderr + proc.stdout


def test_playbook_syntax_check(tmp_path: Path) -> None:
    playbook = need("ansible-playbook")
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[spegel_nodes]\nnode1\n")
    proc = subprocess.run(
        [str(playbook), "--syntax-check", "-i", str(inventory),
         str(ANSIBLE / "playbooks" / "rollout.yml")],
        capture_output=True, text=True, timeout=120, check=False, env=ansible_env(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def render_config(tmp_path: Path, extra: dict[str, Any] | None = None) -> Path:
    """The role's config template, rendered by Ansible itself on localhost."""
    ansible = need("ansible")
    defaults = load(ROLE / "defaults" / "main.yml")
    variables = {k: v for k, v in defaults.items() if k != "spegel_node_node_ip"}
    variables["spegel_node_node_ip"] = "auto"
    variables |= extra or {}
    extra_file = tmp_path / "vars.yml"
    extra_file.write_text(yaml.safe_dump(variables))
    dest = tmp_path / "config.toml"
    proc = subprocess.run(
        [str(ansible), "localhost", "-c", "local", "-i", "localhost,",
         "-e", f"ansible_python_interpreter={sys.executable}", "-e", f"@{extra_file}",
         "-m", "ansible.builtin.template",
         "-a", f"src={ROLE / 'templates' / 'config.toml.j2'} dest={dest} mode=0644"],
        capture_output=True, text=True, timeout=120, check=False, env=ansible_env(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest


def test_config_template_gives_the_settings_spegel_node_reads(tmp_path: Path) -> None:
    config = render_config(tmp_path)
    text = config.read_text()
    assert text.startswith("#") and "Ansible managed" in text
    settings = load_settings(Node(), config)
    defaults = load(ROLE / "defaults" / "main.yml")
    assert [r.url for r in settings.registries] == defaults["spegel_node_registries"]
    assert settings.host_port == 29999
    assert settings.node_ip == "auto"
    assert settings.resolve_tags is True
    assert settings.dial_timeout == "200ms"
    assert settings.gate_failures == 3
    assert settings.hosts_dir == ""


def test_config_template_with_every_setting(tmp_path: Path) -> None:
    config = render_config(
        tmp_path,
        {
            "spegel_node_registries": [],
            "spegel_node_host_port": 30020,
            "spegel_node_node_ip": "10.0.0.7",
            "spegel_node_extra_mirrors": ["http://10.0.0.7:30021"],
            "spegel_node_resolve_tags": False,
            "spegel_node_dial_timeout": "1s",
            "spegel_node_gate_failures": 5,
            "spegel_node_hosts_dir": "/etc/containerd/certs.d",
        },
    )
    settings = load_settings(Node(), config)
    assert settings.registries == ()
    assert settings.host_port == 30020
    assert settings.mirror_urls("10.0.0.7") == ("http://10.0.0.7:30020", "http://10.0.0.7:30021")
    assert settings.capabilities == ("pull",)
    assert (settings.dial_timeout, settings.gate_failures) == ("1s", 5)
    assert settings.hosts_dir == "/etc/containerd/certs.d"


@pytest.mark.parametrize("textfile", ["", "/var/lib/node_exporter/textfile/spegel_node.prom"])
def test_units_task_schedules_doctor_textfile_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], textfile: str
) -> None:
    """The role's install-units argv and unit list, rendered as Ansible renders them (Jinja2),
    then run for real on a fake node: the doctor timer exists exactly when the variable is set."""
    import jinja2
    from support import fake_nodes
    from support.cli import run_cli

    task = load(ROLE / "tasks" / "units.yml")[0]
    env = jinja2.Environment()
    variables = {
        "_spegel_node_bin": "/opt/spegel-node/venv/bin/spegel-node",
        "_spegel_node_dry_run": [],
        "spegel_node_doctor_textfile": textfile,
    }
    argv = env.compile_expression(task["ansible.builtin.command"]["argv"].strip()[2:-2])(
        **variables
    )
    units = env.compile_expression(
        load(ROLE / "vars" / "main.yml")["_spegel_node_units"].strip()[2:-2]
    )(**variables)
    root = tmp_path / "node"
    fake_nodes.make_containerd(root, config_path="/etc/containerd/certs.d")
    (root / "var/lib/node_exporter/textfile").mkdir(parents=True)
    done = run_cli(capsys, *argv[1:], "--root", str(root))
    assert done.code == 0, done.err
    written = {p.name for p in (root / "etc/systemd/system").iterdir()}
    assert set(units) <= written
    assert ("spegel-node-doctor.timer" in units) == bool(textfile)
    assert ("spegel-node-doctor.timer" in written) == bool(textfile)
    if textfile:
        service = (root / "etc/systemd/system/spegel-node-doctor.service").read_text()
        assert f"--textfile {textfile}" in service

"""Facts the docs repeat: one registry list (the Ansible role's defaults are the reference), and a
LICENSE that is the license pyproject.toml declares."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

from spegel_node import settings

REPO = Path(__file__).resolve().parents[1]
ROLE_DEFAULTS = REPO / "ansible/roles/spegel_node/defaults/main.yml"
DOCS_WITH_CONFIG = (REPO / "README.md", REPO / "docs/getting-started.md", REPO / "docs/config.md")


def role_registries() -> list[str]:
    registries = yaml.safe_load(ROLE_DEFAULTS.read_text())["spegel_node_registries"]
    assert isinstance(registries, list) and registries
    return registries


def test_docs_show_the_roles_registry_list() -> None:
    expected = role_registries()
    for path in DOCS_WITH_CONFIG:
        lists = re.findall(r"^\s*registries = (\[.*\])", path.read_text(), re.M)
        assert lists, f"{path.name} shows no registries line"
        for found in lists:
            assert json.loads(found) == expected, f"{path.name}: {found} differs from the role"


def test_the_agents_default_is_the_roles_list() -> None:
    assert list(settings.DEFAULT_REGISTRIES) == role_registries()


def test_license_is_the_declared_apache_2() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    assert declared == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_readme_command_table_lists_every_command() -> None:
    import typer

    from spegel_node.cli import app

    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    listed = set(re.findall(r"^\| `spegel-node ([a-z-]+)", (REPO / "README.md").read_text(), re.M))
    assert listed == commands

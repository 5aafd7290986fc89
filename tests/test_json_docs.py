"""docs/json.md against real output: every command run with `-o json` on fake nodes; each
documented top-level key is in the output with the documented type, every output key is
documented (nested object keys too), the exit status is one the section lists, and errors print
no JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_cli
from support.fake_nodes import make_containerd, make_k3s, write
from support.sandbox import free_port

REPO = Path(__file__).resolve().parents[1]
JSON_MD = REPO / "docs/json.md"
EXEC = "/opt/spegel-node/bin/spegel-node"


def sections() -> dict[str, dict[str, Any]]:
    """Heading command name -> {"keys": {key: (type, meaning)}, "text": section text}."""
    found: dict[str, dict[str, Any]] = {}
    for block in re.split(r"^## ", JSON_MD.read_text(), flags=re.M)[1:]:
        heading, _, body = block.partition("\n")
        names = re.findall(r"`spegel-node ([a-z-]+)", heading)
        keys = {
            m.group(1): (m.group(2).strip(), m.group(3).strip())
            for m in re.finditer(
                r"^\| `([a-z_]+)` \| ([^|]+(?:\\\|[^|]+)*) \| (.*) \|$", body, re.M
            )
        }
        for name in names:
            found[name] = {"keys": keys, "text": body}
    return found


def matches(value: Any, doc_type: str) -> bool:
    types = [t.strip() for t in doc_type.replace("\\|", "|").split("|")]
    for t in types:
        if t == "null" and value is None:
            return True
        if t == "string" and isinstance(value, str):
            return True
        if t == "boolean" and isinstance(value, bool):
            return True
        if t == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t.startswith("array") and isinstance(value, list):
            if "of string" in t:
                return all(isinstance(v, str) for v in value)
            if "of object" in t:
                return all(isinstance(v, dict) for v in value)
            return True
        if t == "object" and isinstance(value, dict):
            return True
    return False


@pytest.fixture
def node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "node"
    make_containerd(root, config_path="/etc/containerd/certs.d")
    write(
        root, "/etc/spegel-node/config.toml", f'node_ip = "127.0.0.1"\nhost_port = {free_port()}\n'
    )
    return root


def run_json(
    capsys: pytest.CaptureFixture[str], *argv: str, codes: tuple[int, ...] = (0,)
) -> tuple[int, dict[str, Any]]:
    result = run_cli(capsys, *argv, "-o", "json")
    assert result.code in codes, (argv, result.code, result.err)
    data = json.loads(result.out)
    assert isinstance(data, dict)
    assert next(iter(data)) == "schema" and data["schema"] == "spegel-node/v1"
    return result.code, data


def check_against_docs(command: str, code: int, data: dict[str, Any]) -> None:
    section = sections()[command]
    documented: dict[str, tuple[str, str]] = section["keys"]
    assert documented, f"docs/json.md has no key table for {command}"
    expected = {
        k
        for k, (_, meaning) in documented.items()
        if not (command == "remove" and meaning.startswith("apply only"))
    }
    assert set(data) == expected, (
        f"{command}: output {sorted(data)} vs documented {sorted(expected)}"
    )
    for key, value in data.items():
        doc_type, meaning = documented[key]
        assert matches(value, doc_type), f"{command}.{key}: {value!r} is not {doc_type}"
        named = set(re.findall(r"`([a-zA-Z_]+)`", meaning))
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict) and key != "units":  # units: file name -> text
                missing = set(item) - named
                assert not missing, f"{command}.{key}: keys {missing} not documented"
    exit_line = re.search(r"^Exit (.*)$", section["text"], re.M)
    assert exit_line, command
    assert re.search(rf"(^|; ){code}\b", exit_line.group(1)), f"{command}: exit {code} undocumented"


def test_every_command_section_is_parsed() -> None:
    assert set(sections()) >= {
        "detect",
        "apply",
        "remove",
        "validate",
        "doctor",
        "helm-values",
        "install-units",
        "configure-containerd",
    }


def test_detect_helm_values_validate(capsys: pytest.CaptureFixture[str], node: Path) -> None:
    for command in ("detect", "helm-values", "validate"):
        code, data = run_json(capsys, command, "--root", str(node))
        check_against_docs(command, code, data)
    bad = node / "bad.toml"
    bad.write_text('[host."http://x"]\ncapabilities = "pull"\n')
    code, data = run_json(capsys, "validate", str(bad), codes=(1,))
    assert data["findings"] and data["ok"] is False
    check_against_docs("validate", code, data)


def test_apply_and_remove(capsys: pytest.CaptureFixture[str], node: Path) -> None:
    for argv in (("apply", "--dry-run"), ("apply",), ("apply", "--no-gate"), ("remove",)):
        code, data = run_json(capsys, *argv, "--root", str(node))
        assert data["command"] == argv[0]
        check_against_docs(argv[0], code, data)
    assert data["changes"]  # remove restored what apply wrote


def test_doctor(capsys: pytest.CaptureFixture[str], node: Path) -> None:
    code, data = run_json(capsys, "doctor", "--root", str(node), codes=(1,))  # Spegel is down
    assert data["checks"]
    check_against_docs("doctor", code, data)


def test_install_units(capsys: pytest.CaptureFixture[str], node: Path) -> None:
    code, data = run_json(capsys, "install-units", "--root", str(node), "--exec", EXEC)
    check_against_docs("install-units", code, data)
    code, data = run_json(
        capsys,
        *("install-units", "--root", str(node), "--exec", EXEC, "--dry-run"),
        *("--textfile", "/var/lib/node_exporter/textfile/spegel_node.prom"),
    )
    assert isinstance(data["textfile"], str)
    check_against_docs("install-units", code, data)


def test_configure_containerd(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    make_containerd(tmp_path)  # no config_path yet
    code, data = run_json(capsys, "configure-containerd", "--root", str(tmp_path), "--dry-run")
    assert data["changed"] is True
    check_against_docs("configure-containerd", code, data)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "--version")
    check_against_docs("--version", code, data)


def test_errors_print_no_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    k3s = tmp_path / "k3s"
    make_k3s(k3s)
    write(k3s, "/etc/spegel-node/config.toml", "registries = 3\n")
    for argv, code in (
        (("detect", "--root", str(empty)), 1),
        (("apply", "--root", str(empty)), 1),
        (("apply", "--root", str(k3s)), 2),
        (("helm-values", "--root", str(k3s)), 2),
    ):
        result = run_cli(capsys, *argv, "-o", "json")
        assert result.code == code, (argv, result.err)
        assert result.out == ""
        assert result.err.startswith("spegel-node: error: ")
        documented = sections()[argv[0]]["text"]
        assert re.search(rf"\b{code} [^;]*no JSON|{code} bad input", documented), argv

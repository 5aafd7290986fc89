"""containerd config reading: v2/v3 layouts, imports and drop-ins, merge rules, snippets."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
from support.cli import run_cli
from support.fake_nodes import (
    make_bottlerocket,
    make_containerd,
    make_eks,
    make_k0s,
    make_k3s,
    make_kind,
    make_talos,
    write,
)

from spegel_node.containerd_config import (
    ContainerdConfig,
    ContainerdConfigError,
    config_snippet,
    read_containerd_config,
)
from spegel_node.node import Node

K3S_CONFIG = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml"
MAIN = "/etc/containerd/config.toml"


def read(root: Path, path: str = MAIN) -> ContainerdConfig:
    return read_containerd_config(Node(root), path)


# --- layouts -------------------------------------------------------------------------------------


def test_plain_default_config_has_no_config_path(tmp_path: Path) -> None:
    make_containerd(
        tmp_path
    )  # `containerd config default`: config_path = "" and an empty mirrors table
    c = read(tmp_path)
    assert c.version == 2
    assert c.config_path is None
    assert c.hosts_dirs == ()
    assert c.discard_unpacked_layers is False
    assert c.use_local_image_pull is None
    assert c.registry_mirrors is False
    assert c.root == "/var/lib/containerd"
    assert c.address == "/run/containerd/containerd.sock"
    assert c.sources == (MAIN,)
    assert c.content_dir == "/var/lib/containerd/io.containerd.content.v1.content"


def test_v3_layout_k3s(tmp_path: Path) -> None:
    make_k3s(tmp_path)
    c = read(tmp_path, K3S_CONFIG)
    assert c.version == 3
    assert c.config_path == "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"
    assert c.discard_unpacked_layers is None  # k3s leaves containerd's default (false)
    assert c.root == "/var/lib/rancher/k3s/agent/containerd"
    assert c.content_dir == "/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content"
    assert c.address == "/run/k3s/containerd/containerd.sock"


def test_v2_layout_k3s_before_containerd_2(tmp_path: Path) -> None:
    make_k3s(tmp_path, version=2)
    c = read(tmp_path, K3S_CONFIG)
    assert (c.version, c.config_path) == (2, "/var/lib/rancher/k3s/agent/etc/containerd/certs.d")


def test_v2_discard_true_on_kind_and_v3_on_eks(tmp_path: Path) -> None:
    make_kind(tmp_path / "kind")
    make_eks(tmp_path / "eks")
    kind = read(tmp_path / "kind")
    eks = read(tmp_path / "eks")
    assert (kind.config_path, kind.discard_unpacked_layers) == ("/etc/containerd/certs.d", True)
    assert eks.version == 3 and eks.discard_unpacked_layers is True
    assert eks.hosts_dirs == ("/etc/containerd/certs.d", "/etc/docker/certs.d")


def test_config_path_list_drops_empty_entries(tmp_path: Path) -> None:
    write(
        tmp_path,
        MAIN,
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = ":/a::/b:"\n',
    )
    assert read(tmp_path).hosts_dirs == ("/a", "/b")


def test_version_1_short_plugin_name(tmp_path: Path) -> None:
    write(
        tmp_path,
        MAIN,
        '[plugins.cri.registry]\nconfig_path = "/etc/containerd/certs.d"\n'
        "[plugins.cri.containerd]\ndiscard_unpacked_layers = true\n",
    )
    c = read(tmp_path)
    assert c.version == 1
    assert (c.config_path, c.discard_unpacked_layers) == ("/etc/containerd/certs.d", True)


def test_v3_file_ignores_v2_layout(tmp_path: Path) -> None:
    # containerd 2.x migrates only files older than version 3
    write(
        tmp_path,
        MAIN,
        'version = 3\n[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = "/old"\n',
    )
    assert read(tmp_path).config_path is None


def test_use_local_image_pull_v3(tmp_path: Path) -> None:
    write(
        tmp_path,
        MAIN,
        "version = 3\n[plugins.'io.containerd.cri.v1.images']\n"
        "use_local_image_pull = true\ndiscard_unpacked_layers = false\n",
    )
    c = read(tmp_path)
    assert (c.use_local_image_pull, c.discard_unpacked_layers) == (True, False)


def test_registry_mirrors_table(tmp_path: Path) -> None:
    make_bottlerocket(tmp_path / "plain")
    make_bottlerocket(tmp_path / "mirrors", mirrors=True)
    assert read(tmp_path / "plain").registry_mirrors is False
    assert read(tmp_path / "mirrors").registry_mirrors is True


# --- imports and merging -------------------------------------------------------------------------


def test_imports_relative_glob_sorted_and_breadth_first(tmp_path: Path) -> None:
    write(tmp_path, MAIN, 'version = 2\nimports = ["conf.d/*.toml", "/etc/extra.toml"]\n')
    write(tmp_path, "/etc/containerd/conf.d/20-b.toml", 'imports = ["../nested.toml"]\n')
    write(tmp_path, "/etc/containerd/conf.d/10-a.toml", "")
    write(tmp_path, "/etc/containerd/conf.d/ignored.txt", "not toml [")
    write(tmp_path, "/etc/containerd/nested.toml", "")
    write(tmp_path, "/etc/extra.toml", f'imports = ["{MAIN}"]\n')  # a cycle is loaded once
    c = read(tmp_path)
    assert c.sources == (
        MAIN,
        "/etc/containerd/conf.d/10-a.toml",
        "/etc/containerd/conf.d/20-b.toml",
        "/etc/extra.toml",
        "/etc/containerd/nested.toml",
    )
    assert str(tmp_path) not in repr(c)


def test_only_star_patterns_are_globs(tmp_path: Path) -> None:
    write(tmp_path, MAIN, 'version = 2\nimports = ["conf.d/[a].toml"]\n')
    write(tmp_path, "/etc/containerd/conf.d/a.toml", "")
    write(tmp_path, "/etc/containerd/conf.d/[a].toml", "")
    assert read(tmp_path).sources == (MAIN, "/etc/containerd/conf.d/[a].toml")


def test_missing_named_import_is_recorded_not_fatal(tmp_path: Path) -> None:
    write(tmp_path, MAIN, 'version = 2\nimports = ["/etc/containerd/gone.toml", "/none/*.toml"]\n')
    c = read(tmp_path)
    assert c.missing_imports == ("/etc/containerd/gone.toml",)
    assert c.sources == (MAIN,)


V2_REGISTRY = (
    '[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = "/etc/containerd/certs.d"\n'
)
V2_RUNTIME = (
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.foo]\n'
    'runtime_type = "io.containerd.runc.v2"\n'
)


def test_v2_import_replaces_whole_cri_table(tmp_path: Path) -> None:
    # containerd 1.x merges imports by plugin table (containerd issue #5837, #7982)
    write(
        tmp_path, MAIN, f'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n{V2_REGISTRY}'
    )
    write(tmp_path, "/etc/containerd/conf.d/runtime.toml", f"version = 2\n{V2_RUNTIME}")
    assert read(tmp_path).config_path is None


def test_v2_import_without_cri_table_keeps_settings(tmp_path: Path) -> None:
    write(
        tmp_path,
        MAIN,
        'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n'
        f'root = "/data/containerd"\n{V2_REGISTRY}',
    )
    write(
        tmp_path,
        "/etc/containerd/conf.d/nri.toml",
        'root = ""\n'  # empty: not an override
        '[plugins."io.containerd.nri.v1.nri"]\ndisable = false\n',
    )
    c = read(tmp_path)
    assert c.config_path == "/etc/containerd/certs.d"
    assert c.root == "/data/containerd"


def test_v3_imports_merge_key_by_key(tmp_path: Path) -> None:
    # containerd 2.x merges plugin tables key by key (containerd PR #9982)
    write(
        tmp_path,
        MAIN,
        'version = 3\nimports = ["conf.d/*.toml"]\nroot = "/data/containerd"\n'
        "[plugins.'io.containerd.cri.v1.images'.registry]\n"
        'config_path = "/etc/containerd/certs.d"\n',
    )
    write(
        tmp_path,
        "/etc/containerd/conf.d/spegel.toml",
        "version = 3\n[plugins.'io.containerd.cri.v1.images']\ndiscard_unpacked_layers = false\n",
    )
    c = read(tmp_path)
    assert c.config_path == "/etc/containerd/certs.d"
    assert c.discard_unpacked_layers is False
    assert c.content_dir == "/data/containerd/io.containerd.content.v1.content"


def test_later_import_wins(tmp_path: Path) -> None:
    write(
        tmp_path,
        MAIN,
        'version = 3\nimports = ["conf.d/*.toml"]\n'
        "[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = \"/a\"\n",
    )
    write(
        tmp_path,
        "/etc/containerd/conf.d/b.toml",
        "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = \"/b\"\n",
    )
    assert read(tmp_path).config_path == "/b"


def test_v2_import_into_v3_main_is_read(tmp_path: Path) -> None:
    # a version-2 file is migrated by containerd 2.x: read its 1.x layout
    write(tmp_path, MAIN, 'version = 3\nimports = ["conf.d/*.toml"]\n')
    write(tmp_path, "/etc/containerd/conf.d/old.toml", f"version = 2\n{V2_REGISTRY}")
    assert read(tmp_path).config_path == "/etc/containerd/certs.d"


def test_k3s_dropin_dir_named_by_imports(tmp_path: Path) -> None:
    dropin = (
        "[plugins.'io.containerd.cri.v1.images']\n"
        "discard_unpacked_layers = false\nuse_local_image_pull = true\n"
    )
    make_k3s(tmp_path, dropin=dropin)
    c = read(tmp_path, K3S_CONFIG)
    assert c.sources[-1].endswith("/config-v3.toml.d/50-custom.toml")
    assert (c.discard_unpacked_layers, c.use_local_image_pull) == (False, True)
    assert c.config_path == "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"


def test_k3s_dropin_dir_not_imported_is_not_read(tmp_path: Path) -> None:
    make_k3s(
        tmp_path,
        imports=False,
        dropin="version = 3\n[plugins.'io.containerd.cri.v1.images']\n"
        "discard_unpacked_layers = true\n",
    )
    c = read(tmp_path, K3S_CONFIG)
    assert c.sources == (K3S_CONFIG,)
    assert c.discard_unpacked_layers is None


def test_talos_cri_toml_merged_from_parts(tmp_path: Path) -> None:
    make_talos(tmp_path / "default")
    make_talos(tmp_path / "custom", customization=True)
    default = read(tmp_path / "default", "/etc/cri/containerd.toml")
    custom = read(tmp_path / "custom", "/etc/cri/containerd.toml")
    assert default.sources == ("/etc/cri/containerd.toml", "/etc/cri/conf.d/cri.toml")
    assert default.config_path == "/etc/cri/conf.d/hosts"
    assert default.discard_unpacked_layers is True
    assert custom.discard_unpacked_layers is False
    assert custom.config_path == "/etc/cri/conf.d/hosts"


def test_k0s_dropin_sets_config_path(tmp_path: Path) -> None:
    make_k0s(tmp_path, dropin_config_path="/etc/k0s/containerd.d/certs.d", nri_dropin=True)
    c = read(tmp_path, "/etc/k0s/containerd.toml")
    assert c.version == 2
    assert c.config_path == "/etc/k0s/containerd.d/certs.d"
    assert c.sources == (
        "/etc/k0s/containerd.toml",
        "/etc/k0s/containerd.d/nri.toml",
        "/run/k0s/containerd-cri.toml",
        "/etc/k0s/containerd.d/cri-registry.toml",
    )


def test_k0s_dropin_applies_before_k0s_regenerates_cri_file(tmp_path: Path) -> None:
    make_k0s(tmp_path, dropin_config_path="/etc/k0s/certs.d", cri_file=False)
    c = read(tmp_path, "/etc/k0s/containerd.toml")
    assert c.config_path == "/etc/k0s/certs.d"
    assert c.missing_imports == ("/run/k0s/containerd-cri.toml",)


def test_k0s_default_has_empty_config_path(tmp_path: Path) -> None:
    make_k0s(tmp_path)
    c = read(tmp_path, "/etc/k0s/containerd.toml")
    assert c.config_path is None
    assert c.discard_unpacked_layers is False


def test_k0s_dropins_ignored_when_not_k0s_managed(tmp_path: Path) -> None:
    make_k0s(tmp_path, dropin_config_path="/etc/k0s/certs.d", cri_file=False)
    write(tmp_path, "/etc/k0s/containerd.toml", "version = 2\n")  # taken over by the operator
    c = read(tmp_path, "/etc/k0s/containerd.toml")
    assert c.config_path is None
    assert c.sources == ("/etc/k0s/containerd.toml",)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("version = 2\n[plugins\n", "is not valid TOML"),
        (
            'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = 1\n',
            "config_path must be a string",
        ),
        (
            'version = 3\n[plugins."io.containerd.cri.v1.images"]\n'
            'discard_unpacked_layers = "no"\n',
            "discard_unpacked_layers must be true or false",
        ),
        (
            'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\nregistry = "x"\n',
            "registry must be a table",
        ),
        ("version = 5\n", "unsupported config version 5"),
        ('version = "2"\n', "version must be an integer"),
        ("imports = [1]\n", "imports must be a list of strings"),
    ],
)
def test_invalid_config(tmp_path: Path, text: str, expect: str) -> None:
    write(tmp_path, MAIN, text)
    with pytest.raises(ContainerdConfigError) as e:
        read(tmp_path)
    message = str(e.value)
    assert message.startswith(f"containerd config {MAIN}: ")
    assert expect in message
    assert "\n" not in message
    assert str(tmp_path) not in message
    assert e.value.exit_code == 1


def test_invalid_import_names_the_import(tmp_path: Path) -> None:
    write(tmp_path, MAIN, 'version = 2\nimports = ["conf.d/*.toml"]\n')
    write(tmp_path, "/etc/containerd/conf.d/bad.toml", "= nope\n")
    with pytest.raises(
        ContainerdConfigError, match=r"/etc/containerd/conf\.d/bad\.toml: is not valid"
    ):
        read(tmp_path)


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ContainerdConfigError, match=f"{MAIN}: does not exist"):
        read(tmp_path)
    path = write(tmp_path, MAIN)
    path.write_bytes(b"version = 2\n# \xff\xfe\n")
    with pytest.raises(ContainerdConfigError, match="is not UTF-8"):
        read(tmp_path)


# --- snippets ------------------------------------------------------------------------------------


def test_snippet_v2() -> None:
    text = config_snippet(2, config_path="/etc/containerd/certs.d", discard_unpacked_layers=False)
    assert text == (
        '[plugins."io.containerd.grpc.v1.cri".registry]\n'
        '  config_path = "/etc/containerd/certs.d"\n'
        "\n"
        '[plugins."io.containerd.grpc.v1.cri".containerd]\n'
        "  discard_unpacked_layers = false\n"
    )
    cri = tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri == {
        "registry": {"config_path": "/etc/containerd/certs.d"},
        "containerd": {"discard_unpacked_layers": False},
    }


def test_snippet_v3() -> None:
    text = config_snippet(
        3,
        config_path="/etc/containerd/certs.d",
        discard_unpacked_layers=False,
        use_local_image_pull=True,
    )
    images = tomllib.loads(text)["plugins"]["io.containerd.cri.v1.images"]
    assert images == {
        "discard_unpacked_layers": False,
        "use_local_image_pull": True,
        "registry": {"config_path": "/etc/containerd/certs.d"},
    }


def test_snippet_only_what_is_asked() -> None:
    assert tomllib.loads(config_snippet(3, discard_unpacked_layers=False)) == {
        "plugins": {"io.containerd.cri.v1.images": {"discard_unpacked_layers": False}}
    }
    assert tomllib.loads(config_snippet(1, config_path="/x")) == {
        "plugins": {"cri": {"registry": {"config_path": "/x"}}}
    }
    assert config_snippet(2) == ""


def test_snippet_escapes_strings() -> None:
    odd = 'C:\\dir "quoted"\tx\x7f'
    text = config_snippet(3, config_path=odd)
    assert tomllib.loads(text)["plugins"]["io.containerd.cri.v1.images"]["registry"] == {
        "config_path": odd
    }


def test_snippet_rejects_what_the_version_lacks() -> None:
    with pytest.raises(ValueError, match="version 3"):
        config_snippet(2, use_local_image_pull=True)
    with pytest.raises(ValueError, match="1, 2, 3 or 4"):
        config_snippet(5, config_path="/x")
    # version 4 (containerd 2.3+) keeps version 3's CRI tables
    assert config_snippet(4, config_path="/x") == config_snippet(3, config_path="/x")


@pytest.mark.parametrize("version", [1, 2, 3])
def test_snippet_pasted_into_a_config_takes_effect(tmp_path: Path, version: int) -> None:
    snippet = config_snippet(
        version, config_path="/etc/containerd/certs.d", discard_unpacked_layers=False
    )
    write(tmp_path, MAIN, f"version = {version}\n\n{snippet}")
    c = read(tmp_path)
    assert (c.config_path, c.discard_unpacked_layers) == ("/etc/containerd/certs.d", False)


def _dumped_config_path(config: Path) -> str:
    """What the real containerd makes of a config file: `containerd config dump`."""
    out = subprocess.run(
        ["containerd", "--config", str(config), "config", "dump"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return str(
        tomllib.loads(out)["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"]
    )


@pytest.mark.parametrize(
    ("main", "imported", "expected"),
    [
        # version 1: only the short plugin name counts; the full name is ignored
        ('[plugins.cri.registry]\n  config_path = "/short"\n', None, "/short"),
        ('[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/full"\n', None, ""),
        # version 2: an import is read by the main file's version (it has none of its own here)
        (
            'version = 2\nimports = ["IMPORT"]\n',
            '[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/y"\n',
            "/y",
        ),
    ],
)
def test_plugin_names_are_read_as_the_real_containerd_reads_them(
    tmp_path: Path, main: str, imported: str | None, expected: str
) -> None:
    if imported is not None:
        (tmp_path / "import.toml").write_text(imported)
        main = main.replace("IMPORT", str(tmp_path / "import.toml"))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/config.toml").write_text(main)
    assert _dumped_config_path(tmp_path / "etc/config.toml") == expected
    # the reader takes node paths: the import is absolute on the host, so read with root /
    ours = read_containerd_config(Node(Path("/")), str(tmp_path / "etc/config.toml"))
    assert (ours.config_path or "") == expected


def test_short_plugin_name_under_a_version_2_main_file_stops_containerd(tmp_path: Path) -> None:
    (tmp_path / "import.toml").write_text('[plugins.cri.registry]\n  config_path = "/x"\n')
    main = tmp_path / "config.toml"
    main.write_text(f'version = 2\nimports = ["{tmp_path / "import.toml"}"]\n')
    real = subprocess.run(
        ["containerd", "--config", str(main), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert real.returncode != 0
    assert "invalid plugin key URI" in real.stderr
    with pytest.raises(ContainerdConfigError, match="containerd will not start"):
        read_containerd_config(Node(Path("/")), str(main))


# The containerd config goes through the same guarded loader as hosts.toml (tomlload): deep
# nesting was a RecursionError traceback in detect and doctor, and one dotted key of 20,000
# parts made tomllib spend about 6 s (doctor's bound is 5 s).
@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        ("x = " + "[" * 5_000 + "]" * 5_000, "nested too deeply"),
        ("x = " + "{a = " * 3_000 + "1" + "}" * 3_000, "nested too deeply"),
        ("a" + ".a" * 20_000 + " = 1", "too complex to parse safely"),
    ],
)
def test_hostile_containerd_config_is_one_clean_error(
    tmp_path: Path, tail: str, reason: str
) -> None:
    node = Node(tmp_path)
    write(tmp_path, "/etc/containerd/config.toml", "version = 2\n" + tail + "\n")
    with pytest.raises(ContainerdConfigError) as err:
        read_containerd_config(node, "/etc/containerd/config.toml")
    assert reason in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("command", [["detect"], ["doctor"], ["configure-containerd", "--dry-run"]])
def test_nested_containerd_config_never_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    make_containerd(tmp_path, config_path="/etc/containerd/certs.d")
    write(tmp_path, "/etc/containerd/config.toml", "version = 2\nx = " + "[" * 5_000 + "]" * 5_000)
    result = run_cli(capsys, *command, "--root", str(tmp_path), "-o", "json")
    assert result.code in (0, 1)
    assert "Traceback" not in result.err and "RecursionError" not in result.out + result.err
    assert "nested too deeply" in result.out + result.err

"""Remediation text a person can paste: config snippets in each flavor's own place, commands."""

from __future__ import annotations

import posixpath
import shlex
from typing import TYPE_CHECKING

from spegel_node.containerd_config import config_snippet
from spegel_node.flavors import DEFAULT_RESTART
from spegel_node.flavors import flavor as flavor_record
from spegel_node.instructions import bottlerocket_settings, distro_owned_message
from spegel_node.node import DEFAULT_SETTINGS_PATH
from spegel_node.output import indent

if TYPE_CHECKING:
    from spegel_node.doctor.facts import Facts

APPLY = "spegel-node apply"
TIMER_UNITS = ("spegel-node-repair.timer", "spegel-node-repair.path")
ENABLE_TIMER = "sudo systemctl enable --now " + " ".join(TIMER_UNITS)


INSTALL_UNITS = "sudo spegel-node install-units && sudo systemctl daemon-reload"


def restart_command(flavor: str | None) -> str:
    """The restart command, with a trailing `# comment` for the node-role variant."""
    return flavor_record(flavor).restart


def restart_only(flavor: str | None) -> str:
    """The restart command alone, for use inside a sentence."""
    return restart_command(flavor).split("#", 1)[0].rstrip()


def cli_command(facts: Facts, args: str, *, sudo: bool = False) -> str:
    """`spegel-node ARGS` with the --root, --config and layout overrides doctor was run with,
    so the fix acts on the node and config doctor diagnosed. Every spegel-node command doctor
    prints is made here. An option ARGS already names is not repeated."""
    words = args.split()
    options: list[tuple[str, str]] = []
    if str(facts.node.root) != "/":
        options.append(("--root", str(facts.node.root)))
    options += [(flag, value) for flag, value in facts.command_options if flag not in words]
    tail = "".join(f" {flag} {shlex.quote(value)}" for flag, value in options)
    return f"{'sudo ' if sudo else ''}spegel-node {args}{tail}"


def config_file(facts: Facts) -> str:
    """The config file doctor read (the --config given, else the default), for "set X in ..."."""
    given = [value for flag, value in facts.command_options if flag == "--config"]
    return given[-1] if given else DEFAULT_SETTINGS_PATH


def apply_command(facts: Facts) -> str:
    """`spegel-node apply`, with the options doctor was given (cli_command)."""
    return cli_command(facts, "apply")


def configure_command(facts: Facts) -> str:
    return cli_command(facts, "configure-containerd")


def install_units_command(facts: Facts) -> str:
    return f"{cli_command(facts, 'install-units', sudo=True)} && sudo systemctl daemon-reload"


def _with_root(command: str, facts: Facts) -> str:
    return cli_command(facts, command.removeprefix("spegel-node "))


def _snippet_version(facts: Facts, *, needs_v3: bool) -> int:
    config = facts.config
    if config is not None and not needs_v3:
        return config.version
    if needs_v3 or facts.containerd_version.at_least((2, 0, 0)):
        return 3
    return 2


def cri_fix(
    facts: Facts,
    *,
    config_path: str | None = None,
    discard_unpacked_layers: bool | None = None,
    use_local_image_pull: bool | None = None,
) -> str:
    """Where and how to set these CRI values on this node, then how to make containerd see them."""
    record = flavor_record(facts.flavor)
    via = record.cri_config_via
    if via == "api-settings":
        return (
            f"{record.display} renders containerd's config from its API settings (no hosts dir); "
            "set the mirrors there instead:\n"
            + indent(bottlerocket_settings(facts.settings.registries, facts.mirror_urls))
        )
    needs_v3 = use_local_image_pull is not None
    version = 3 if via == "machine-config" else _snippet_version(facts, needs_v3=needs_v3)
    snippet = config_snippet(
        version,
        config_path=config_path,
        discard_unpacked_layers=discard_unpacked_layers,
        use_local_image_pull=use_local_image_pull,
    )
    if via == "machine-config":
        return _talos(snippet)
    if via == "kind-patch":
        return (
            "kind writes the node's containerd config from the cluster config; add to kind.yaml:\n"
            "containerdConfigPatches:\n- |-\n"
            + indent(snippet)
            + f"\nthen recreate the cluster: {record.restart}"
        )
    if via == "nodeadm":
        return (
            f"nodeadm renders {record.config}; add to the NodeConfig (user data):\n"
            "spec:\n  containerd:\n    config: |\n"
            + indent(snippet, "      ")
            + f"\nthen replace the node (or edit {record.config} and `{DEFAULT_RESTART}`)"
        )
    where = _where(facts, version)
    note = ""
    if record.configurable and use_local_image_pull is None:
        note = f"\n(or let spegel-node make this change: `{configure_command(facts)}`)"
    config = facts.config
    if needs_v3 and config is not None and config.version < 3:
        note = (
            f"\n({config.path} is a version {config.version} file: migrate it first with "
            "`containerd config migrate`; use_local_image_pull exists only in version 3)"
        )
    return f"{where}\n{indent(snippet)}{note}\nthen: {record.restart}"


def _where(facts: Facts, version: int) -> str:
    record = flavor_record(facts.flavor)
    layout = facts.layout
    main = (layout.containerd_config if layout else None) or record.config
    if record.cri_config_via == "rancher-template":
        return _rancher_where(facts, record.name, main, version)
    if record.dropin is not None:
        return (
            f"{record.display} generates containerd's CRI config; create the drop-in "
            f"{record.dropin.path} with `version = {version}` and:"
        )
    if record.cri_config_via == "microk8s-template":
        template = posixpath.join(posixpath.dirname(record.config), "containerd-template.toml")
        return (
            f"{record.display} regenerates {posixpath.basename(record.config)} from {template}; "
            "add there (keys into an existing table of the same name):"
        )
    if facts.config is None:
        return f"create {main} with `version = {version}` and:"
    return f"add to {main} (put the keys into the existing table if it already has one):"


def _rancher_where(facts: Facts, distro: str, main: str, version: int) -> str:
    base = posixpath.dirname(main)
    dropins = "config-v3.toml.d" if version >= 3 else "config.toml.d"
    try:
        text = (facts.read_file(main) or b"").decode("utf-8", "replace")
    except OSError:
        text = ""
    if dropins in text and version >= 3:
        return (
            f"{distro} rewrites {main} at every start; create {base}/{dropins}/50-spegel.toml with:"
        )
    template = "config-v3.toml.tmpl" if version >= 3 else "config.toml.tmpl"
    return (
        f"{distro} rewrites {main} at every start from {base}/{template}: copy {main} to "
        f"{template} (dropping its first comment line) and set, in the existing tables:"
    )


def _talos(snippet: str) -> str:
    patch = (
        "machine:\n  files:\n    - path: /etc/cri/conf.d/20-customization.part\n"
        "      op: create\n      content: |\n" + indent(snippet, "        ")
    )
    return (
        "Talos builds containerd's config from its machine config; save as spegel-cri.yaml and "
        "apply with `talosctl patch mc --nodes NODE --patch @spegel-cri.yaml` (Talos restarts "
        "the CRI or asks for a reboot):\n" + patch
    )


def mirrors_fix(facts: Facts) -> str:
    """How to get the Spegel mirror (back) into the hosts files on this flavor."""
    if flavor_record(facts.flavor).distro_owned:
        return distro_owned_message(facts.flavor, facts.settings.registries, facts.mirror_urls)
    return f"run `{apply_command(facts)}` (it puts the Spegel mirror first and keeps the rest)"


def gate_fix(facts: Facts) -> str:
    """What to do while the health gate has withdrawn the mirror."""
    return (
        "make Spegel answer again (see spegel.v2); the next "
        f"`{apply_command(facts)}` (the repair timer runs it) puts the mirror back as soon as "
        "/v2/ answers"
    )

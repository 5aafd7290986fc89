"""containerd.*: the socket answers, the config is readable, and the CRI settings that decide
whether hosts.toml is read at all (config_path), whether Spegel has layers to serve
(discard_unpacked_layers) and whether CRI pulls go through the hosts files (use_local_image_pull).
The running containerd's values (CRI status) win over the file's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from spegel_node.doctor.checks import no_layout
from spegel_node.doctor.facts import Facts
from spegel_node.doctor.model import Check, CheckResult
from spegel_node.doctor.remedy import (
    apply_command,
    cli_command,
    config_file,
    cri_fix,
    restart_command,
)
from spegel_node.flavors import flavor as flavor_record

LOCAL_PULL_SINCE = (2, 1, 0)


@dataclass(frozen=True)
class ContainerdSocket(Check):
    area: ClassVar[str] = "containerd"

    @property
    def id(self) -> str:
        return "containerd.socket"

    def run(self, facts: Facts) -> CheckResult:
        layout, answer = facts.layout, facts.socket
        if layout is None or answer is None:
            return no_layout(self)
        sock = layout.containerd_socket
        restart = restart_command(layout.flavor)
        elsewhere = (
            "If containerd listens elsewhere, set containerd_socket in "
            f"{config_file(facts)} (or --containerd-socket)."
        )
        if answer.state == "ok":
            ms = answer.elapsed_s * 1000
            details = [f"revision {answer.revision}"] if answer.revision else []
            if answer.status_error:
                return self.warn(
                    f"containerd {answer.version} answers on {sock}, but {answer.status_error}",
                    "Kubernetes pulls through the CRI plugin; check containerd's log for why it "
                    f"did not load (journalctl -u containerd), then: {restart}",
                    details,
                )
            return self.passed(
                f"containerd {answer.version} answers on {sock} ({ms:.0f} ms)", details
            )
        if answer.state == "denied":
            return self.warn(f"cannot connect to {sock}: {answer.detail}", "run doctor as root")
        if answer.state in ("timeout", "no_answer"):
            return self.fail(
                f"{sock} {answer.detail}: containerd is hung",
                f"look at containerd's log (journalctl -u containerd), then restart it: {restart}",
            )
        if answer.state in ("missing", "refused"):
            return self.fail(
                f"{sock} {answer.detail}: containerd is not running, or listens elsewhere",
                f"start containerd: {restart}\n{elsewhere}",
            )
        return self.fail(
            f"{sock} {answer.detail}",
            f"{sock} should be containerd's socket. {elsewhere}",
        )


@dataclass(frozen=True)
class ContainerdConfigReadable(Check):
    area: ClassVar[str] = "containerd"

    @property
    def id(self) -> str:
        return "containerd.config"

    def run(self, facts: Facts) -> CheckResult:
        layout = facts.layout
        if layout is None:
            return no_layout(self)
        version = facts.containerd_version
        running = f"containerd {version.text}" if version.text else "containerd version unknown"
        version_line = f"version: {version.text or 'unknown'} ({version.source})"
        if facts.config_error:
            return self.fail(
                f"{facts.config_error}",
                "containerd refuses to start with an invalid config; fix the file "
                "(`containerd config dump` shows what containerd makes of it)",
            )
        config = facts.config
        if config is None:
            return self.warn(
                f"no containerd config at {layout.containerd_config or '/etc/containerd/config.toml'}"
                f": containerd runs on its built-in defaults ({running})",
                "containerd reads no hosts.toml without config_path before 2.2; write a config "
                "(containerd config default | sudo tee /etc/containerd/config.toml) and set "
                "config_path (see containerd.config_path)",
                [version_line],
            )
        details = [version_line, *(f"read {s}" for s in config.sources)]
        if config.missing_imports:
            missing = ", ".join(config.missing_imports)
            return self.fail(
                f"{config.path} imports {missing}, which does not exist: containerd will not start",
                f"create {missing} or remove it from `imports` in {config.path}",
                details,
            )
        if config.registry_mirrors:
            status = self.fail if config.config_path else self.warn
            why = (
                "sets both registry.mirrors and config_path: containerd's CRI plugin refuses to load"
                if config.config_path
                else "uses the deprecated registry.mirrors table, which replaces hosts.toml"
            )
            return status(
                f"{config.path} {why}",
                f"move each registry.mirrors entry into {facts.hosts_dir}/<registry>/hosts.toml, "
                f"delete the registry.mirrors tables from {config.path}, set config_path "
                f"(see containerd.config_path), then: {restart_command(layout.flavor)}",
                details,
            )
        merged = f", merged from {len(config.sources)} files" if len(config.sources) > 1 else ""
        return self.passed(
            f"{config.path} (config version {config.version}{merged}); {running}", details
        )


@dataclass(frozen=True)
class ConfigPath(Check):
    area: ClassVar[str] = "containerd"

    @property
    def id(self) -> str:
        return "containerd.config_path"

    def run(self, facts: Facts) -> CheckResult:
        layout = facts.layout
        if layout is None:
            return no_layout(self)
        setting = facts.setting("config_path")
        roots = facts.hosts_roots
        hosts_dir = facts.hosts_dir
        restart = restart_command(layout.flavor)
        if roots.read_by_containerd is False:
            if setting.restart_pending:
                return self.fail(
                    f"{facts.config.path if facts.config else 'the config'} sets config_path = "
                    f"{setting.file_value}, but the running containerd has none: it was not "
                    "restarted since",
                    f"restart containerd: {restart}",
                )
            return self.fail(
                f"config_path is not set ({setting.source}): containerd reads no hosts.toml, "
                "so it never asks Spegel (Spegel v0.7+ no longer refuses such nodes)",
                cri_fix(facts, config_path=hosts_dir),
            )
        if roots.read_by_containerd is None:
            return self.warn(
                f"config_path not confirmed: {roots.source} is {':'.join(roots.roots)}",
                "confirm on the node with `crictl info | grep configPath`",
            )
        joined = ":".join(roots.roots)
        if hosts_dir not in roots.roots:
            return self.fail(
                f"config_path = {joined} ({roots.source}) does not include {hosts_dir}, "
                "where spegel-node writes",
                f'either point spegel-node at it: set hosts_dir = "{roots.roots[0]}" in '
                f"{config_file(facts)}, run `{cli_command(facts, f'remove --hosts-dir {hosts_dir}')}` "
                f"and `{apply_command(facts)}`; or add the dir to config_path:\n"
                + cri_fix(facts, config_path=":".join((hosts_dir, *roots.roots))),
            )
        if setting.restart_pending:
            return self.warn(
                f"the running containerd uses config_path = {setting.live_value}, but "
                f"{facts.config.path if facts.config else 'the config'} says {setting.file_value}",
                f"restart containerd to use the file's value: {restart}",
            )
        return self.passed(f"config_path = {joined} ({roots.source}) includes {hosts_dir}")


@dataclass(frozen=True)
class DiscardUnpackedLayers(Check):
    area: ClassVar[str] = "containerd"

    @property
    def id(self) -> str:
        return "containerd.discard_unpacked_layers"

    def run(self, facts: Facts) -> CheckResult:
        layout = facts.layout
        if layout is None:
            return no_layout(self)
        setting = facts.setting("discard_unpacked_layers")
        why = (
            "containerd deletes layers once unpacked, so Spegel has nothing to serve to other "
            "nodes (Spegel v0.7+ no longer refuses to start on such nodes)"
        )
        if setting.value is True:
            fix = (
                f"the config file already says false; restart containerd: "
                f"{restart_command(layout.flavor)}"
                if setting.file_value is False
                else cri_fix(facts, discard_unpacked_layers=False)
            )
            return self.fail(f"discard_unpacked_layers = true ({setting.source}): {why}", fix)
        if setting.file_value is True:
            return self.warn(
                f"the running containerd keeps layers, but {facts.config.path if facts.config else 'its config'} "
                "sets discard_unpacked_layers = true: the next restart breaks Spegel",
                cri_fix(facts, discard_unpacked_layers=False),
            )
        if setting.value is None:
            if (
                facts.config is None
                and not setting.live_known
                and flavor_record(layout.flavor).discards_unpacked_layers
            ):
                return self.warn(
                    f"cannot tell: no config file and no answer from containerd, and "
                    f"{layout.flavor} discards unpacked layers by default",
                    cri_fix(facts, discard_unpacked_layers=False),
                )
            return self.passed(
                f"not set ({setting.source}): containerd's default, false, keeps layers"
            )
        return self.passed(f"discard_unpacked_layers = false ({setting.source})")


@dataclass(frozen=True)
class LocalImagePull(Check):
    area: ClassVar[str] = "containerd"

    @property
    def id(self) -> str:
        return "containerd.local_image_pull"

    def run(self, facts: Facts) -> CheckResult:
        layout = facts.layout
        if layout is None:
            return no_layout(self)
        version = facts.containerd_version
        if version.at_least(LOCAL_PULL_SINCE) is False:
            return self.skip(
                f"containerd {version.text} pulls images in the CRI plugin itself "
                "(the transfer-service pull path exists from 2.1)"
            )
        setting = facts.setting("use_local_image_pull")
        if setting.value is True:
            return self.passed(f"use_local_image_pull = true ({setting.source})")
        state = "false" if setting.value is False else "not set"
        roots = facts.hosts_roots.roots
        running = (
            f"containerd {version.text}" if version.version else "containerd (version unknown)"
        )
        if len(roots) <= 1:
            # Measured on 2.1.9, 2.2.9 and 2.3.7 (tests/test_cri_pull.py): with one root the
            # transfer service reads hosts.toml like the CRI's own pull path.
            return self.passed(
                f"{running}, use_local_image_pull {state}: pulls go through the transfer "
                f"service, which reads hosts.toml from the one config_path root {roots[0] if roots else ''}"
            )
        fix = (
            f'either keep one root, config_path = "{facts.hosts_dir}":\n'
            + cri_fix(facts, config_path=facts.hosts_dir)
            + "\nor pull in the CRI plugin itself:\n"
            + cri_fix(facts, use_local_image_pull=True)
        )
        summary = (
            f"{running}, use_local_image_pull {state}, config_path has {len(roots)} roots "
            f"({':'.join(roots)}): the transfer service takes them as one literal directory, so CRI "
            "pulls read no hosts.toml and never reach Spegel (containerd #12415, Spegel #1272)"
        )
        if version.version is None:
            return self.warn(summary + "; on 2.1+ this fails", fix)
        return self.fail(summary, fix)

"""The `spegel-node` command line: thin wrappers that run the flow and return an exit code."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional  # Optional: typer evaluates it on 3.9

import typer

from spegel_node import __version__
from spegel_node.compat import StrEnum
from spegel_node.errors import BadInput, NeedsRoot, SpegelNodeError, denied_to_non_root
from spegel_node.node import Node

if TYPE_CHECKING:
    from spegel_node.layout import Layout
    from spegel_node.settings import Settings

app = typer.Typer(
    name="spegel-node",
    help=(
        "Keep containerd on this node configured to pull through Spegel, and say when it is not.\n\n"
        "Examples:\n\n"
        "  spegel-node detect\n\n"
        "  spegel-node apply --dry-run\n\n"
        "  spegel-node doctor --image ghcr.io/spegel-org/spegel:v0.7.4\n\n"
        "  spegel-node validate --root /host   # from a pod, with the host at /host"
    ),
    add_completion=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class UnitMode(StrEnum):
    timer = "timer"
    service = "service"


class OutputFormat(StrEnum):
    text = "text"
    json = "json"


RootOpt = Annotated[
    Path, typer.Option("--root", help="The node's filesystem root (e.g. /host in a pod).")
]
OutputOpt = Annotated[
    OutputFormat, typer.Option("--output", "-o", help="text (table or plain lines) or json.")
]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        help="Config file, read as given [default: /etc/spegel-node/config.toml under --root].",
    ),
]
HostsDirOpt = Annotated[
    Optional[str],
    typer.Option("--hosts-dir", help="Override the hosts (certs.d) dir, a node path."),
]
SocketOpt = Annotated[
    Optional[str],
    typer.Option("--containerd-socket", help="Override containerd's socket, a node path."),
]
CtrConfigOpt = Annotated[
    Optional[str],
    typer.Option("--containerd-config", help="Override containerd's config file, a node path."),
]


@dataclass(frozen=True)
class Common:
    root: Path
    output: str
    config: Path | None
    overrides: dict[str, str | None]

    @property
    def node(self) -> Node:
        return Node(self.root)


def _common(
    root: Path,
    output: OutputFormat,
    config: Path | None,
    hosts_dir: str | None,
    socket: str | None,
    ctr: str | None,
) -> Common:
    if not root.is_dir():
        raise BadInput(f"--root {root} is not a directory")
    overrides = {"hosts_dir": hosts_dir, "containerd_socket": socket, "containerd_config": ctr}
    return Common(root, output.value, config, overrides)


_COMMON_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
    for name, annotation, default in (
        ("root", RootOpt, Path("/")),
        ("output", OutputOpt, OutputFormat.text),
        ("config", ConfigOpt, None),
        ("hosts_dir", HostsDirOpt, None),
        ("containerd_socket", SocketOpt, None),
        ("containerd_config", CtrConfigOpt, None),
    )
]


def _evaluated_signature(command: Callable[..., Any]) -> inspect.Signature:
    """The signature with its annotations evaluated, as typer needs them (on Python 3.9 typer
    0.23 reads the strings `from __future__ import annotations` leaves, and loses the options;
    `inspect.signature(eval_str=)` is 3.10+)."""
    hints = typing.get_type_hints(command, include_extras=True)
    params = []
    for p in inspect.signature(command).parameters.values():
        hint = hints.get(p.name, p.annotation)
        args = typing.get_args(hint)
        # Before 3.11 a None default wraps Annotated[X, ...] in Optional[...]: unwrap it.
        if typing.get_origin(hint) is typing.Union and len(args) == 2 and type(None) in args:
            inner = args[0] if args[1] is type(None) else args[1]
            if typing.get_origin(inner) is Annotated:
                hint = inner
        params.append(p.replace(annotation=hint))
    return inspect.Signature(params, return_annotation=hints.get("return", inspect.Signature.empty))


def node_command(name: str | None = None) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Register a command that also takes the options every command has (--root, --output,
    --config and the layout overrides, SPEC "Commands") and gets them as its first argument,
    `common: Common`, checked once."""

    def register(command: Callable[..., int]) -> Callable[..., int]:
        own = list(_evaluated_signature(command).parameters.values())[1:]

        @functools.wraps(command)
        def run(**kwargs: Any) -> int:
            _inherit_common(kwargs)
            common = _common(*(kwargs.pop(p.name) for p in _COMMON_OPTIONS))
            try:
                return command(common, **kwargs)
            except OSError as e:
                if denied_to_non_root(e):  # one line naming the node path, not a traceback
                    raise NeedsRoot([common.node.display(e.filename or "")]) from e
                raise

        params = [*own, *_COMMON_OPTIONS]
        run.__signature__ = inspect.Signature(params, return_annotation=int)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params} | {"return": int}
        app.command(name)(run)
        return command

    return register


def _click(module: str) -> Any:
    """typer's own click (typer 0.24 and later), or the click package (typer 0.23, Python 3.9)."""
    import importlib

    try:
        return importlib.import_module(f"typer._click.{module}")
    except ImportError:
        return importlib.import_module(f"click.{module}")


def _usage_exception() -> Any:
    """typer.TyperException (0.27 and later), click.ClickException before."""
    return getattr(typer, "TyperException", None) or _click("exceptions").ClickException


def _inherit_common(kwargs: dict[str, Any]) -> None:
    """A common option given before the subcommand applies unless the subcommand sets it too."""
    ParameterSource = _click("core").ParameterSource
    get_current_context = _click("globals").get_current_context

    ctx = get_current_context()
    before = ctx.obj if isinstance(ctx.obj, dict) else {}
    for p in _COMMON_OPTIONS:
        if p.name in before and ctx.get_parameter_source(p.name) in (None, ParameterSource.DEFAULT):
            kwargs[p.name] = before[p.name]


def _main(ctx: typer.Context, version: bool = False, **common: Any) -> None:
    """spegel-node"""
    ctx.obj = common  # converted values, for _inherit_common
    if version:
        if common["output"] == OutputFormat.json:
            import platform

            from spegel_node.output import print_json

            print_json(
                {
                    "version": __version__,
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                }
            )
        else:
            print(f"spegel-node {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        raise _click("exceptions").UsageError("missing command (see spegel-node --help)")


_VersionOpt = Annotated[
    bool, typer.Option("--version", help="Print the version (with -o json: Python, platform).")
]
_main.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter(
            "version", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=_VersionOpt
        ),
        *_COMMON_OPTIONS,
    ],
    return_annotation=None,
)
app.callback(invoke_without_command=True)(_main)


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def completion(
    shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")],
) -> int:
    """Print a shell completion script.

    Examples:

      source <(spegel-node completion bash)

      spegel-node completion zsh > "${fpath[1]}/_spegel-node"

      spegel-node completion fish > ~/.config/fish/completions/spegel-node.fish
    """
    from typer._completion_shared import get_completion_script

    script = get_completion_script(
        prog_name="spegel-node", complete_var="_SPEGEL_NODE_COMPLETE", shell=shell.value
    )
    print(script)
    return 0


completion.__signature__ = _evaluated_signature(completion)  # type: ignore[attr-defined]
app.command()(completion)


def _settings_and_layout(common: Common) -> tuple[Settings, Layout]:
    from spegel_node.layout import detect
    from spegel_node.settings import load_settings

    settings = load_settings(common.node, common.config, common.overrides)
    layout = detect(
        common.node,
        hosts_dir=settings.hosts_dir,
        containerd_socket=settings.containerd_socket,
        containerd_config=settings.containerd_config,
    )
    return settings, layout


@node_command()
def detect(common: Common) -> int:
    """Identify the node's flavor and containerd layout.

    Flavors: k3s, rke2, talos, k0s, microk8s, kind, eks, bottlerocket, containerd. Evidence comes
    from markers, sockets, the containerd config and the running containerd's command line.
    Exit 1 when no containerd layout is found.

    Examples:

      spegel-node detect

      spegel-node detect --output json --root /host
    """
    from spegel_node.report import layout_report

    _, layout = _settings_and_layout(common)
    layout_report(layout, common.output)
    return 0


@node_command()
def apply(
    common: Common,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and a diff; write nothing.")
    ] = False,
    no_gate: Annotated[
        bool, typer.Option("--no-gate", help="Advertise the mirror without probing /v2/.")
    ] = False,
) -> int:
    """Put the Spegel mirror first in hosts.toml files.

    Every mirrored registry's hosts.toml lists the Spegel mirror(s) first.

    Existing files are merged (everything else kept); new files start with '# managed by
    spegel-node'. While the mirror's /v2/ does not answer (gate_failures probes in a row) the
    Spegel host tables are withdrawn. Exit 1 when refused (read-only or distro-owned dir),
    2 on bad input.

    Examples:

      spegel-node apply --dry-run

      spegel-node apply --hosts-dir /etc/containerd/certs.d --no-gate
    """
    from spegel_node.apply import apply_mirrors
    from spegel_node.report import outcome_report

    settings, layout = _settings_and_layout(common)
    outcome = apply_mirrors(common.node, layout, settings, dry_run=dry_run, use_gate=not no_gate)
    outcome_report(outcome, common.output)
    return outcome.exit_code


@node_command()
def remove(
    common: Common,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and a diff; write nothing.")
    ] = False,
) -> int:
    """Undo apply, restoring files byte for byte.

    A file apply changed is restored byte-for-byte while it still holds what apply wrote; if
    the distro rewrote it since, only the Spegel host tables are stripped. Files and dirs apply
    created are deleted.

    Examples:

      spegel-node remove --dry-run

      spegel-node remove
    """
    from spegel_node.apply import remove_mirrors
    from spegel_node.report import outcome_report

    settings, layout = _settings_and_layout(common)
    outcome = remove_mirrors(common.node, layout, settings, dry_run=dry_run)
    outcome_report(outcome, common.output)
    return outcome.exit_code


@node_command()
def validate(
    common: Common,
    paths: Annotated[
        Optional[list[Path]],
        typer.Argument(help="hosts.toml files or hosts dirs (node paths under --root)."),
    ] = None,
    containerd_version: Annotated[
        Optional[str],
        typer.Option(
            "--containerd-version", help="Judge with this containerd's rules, e.g. 1.7.20."
        ),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Treat warnings as errors.")] = False,
) -> int:
    """Check hosts.toml files with containerd's rules.

    containerd drops a bad file silently and pulls upstream. PATHs are files or hosts dirs
    (default: the node's hosts dir). Exit 1 on errors (and on warnings with --strict).

    Examples:

      spegel-node validate

      spegel-node validate ./certs.d --containerd-version 1.7.20 --strict
    """
    from spegel_node.report import findings_report
    from spegel_node.validate_paths import Rules, node_rules, validate_targets

    rules = None
    if containerd_version:
        from spegel_node.validate import parse_containerd_version

        rules = Rules(parse_containerd_version(containerd_version), "--containerd-version")
    if paths:
        targets = [str(p) for p in paths]
    else:
        _, layout = _settings_and_layout(common)
        from spegel_node.apply import hosts_dir_of

        targets = [hosts_dir_of(layout)]
    if rules is None:
        rules = node_rules(common.node, lambda: _settings_and_layout(common))
    findings, files = validate_targets(common.node, targets, rules.version)
    findings_report(findings, files, common.output, strict, rules)
    failing = [f for f in findings if f.severity == "error" or strict]
    return 1 if failing else 0


@node_command()
def doctor(
    common: Common,
    image: Annotated[
        Optional[str],
        typer.Option(
            "--image",
            help="Also ask the local Spegel whether a peer can serve this image (e.g. alpine:3.20).",
        ),
    ] = None,
    textfile: Annotated[
        Optional[Path],
        typer.Option(
            "--textfile",
            help="Also write the results in Prometheus text format to FILE (a host path, "
            "written atomically), for node_exporter's textfile collector.",
        ),
    ] = None,
    ignore: Annotated[
        Optional[list[str]],
        typer.Option(
            "--ignore",
            metavar="ID",
            help="Still run and show this check, marked ignored, but never fail on it; "
            "repeatable, shell-style globs allowed (e.g. 'spegel.*').",
        ),
    ] = None,
) -> int:
    """Say exactly what is wrong on this node, read-only.

    Diagnoses the whole chain: layout, containerd settings, hosts files, Spegel answering. Every check has a stable id (docs/checks.md), a status and, when not passing,
    what to change. Finishes within 5 s even when Spegel or containerd hangs. Exit 1 when a
    check failed (warnings and --ignore'd checks do not fail).

    Examples:

      spegel-node doctor

      spegel-node doctor --image ghcr.io/spegel-org/spegel:v0.7.4 --output json

      spegel-node doctor --textfile /var/lib/node_exporter/textfile/spegel_node.prom

      spegel-node doctor --ignore spegel.v2   # first rollout, before Spegel runs
    """
    from spegel_node.doctor import run_doctor

    return run_doctor(
        common.node,
        config=common.config,
        overrides=common.overrides,
        output=common.output,
        image=image,
        textfile=textfile,
        ignore=ignore or (),
    )


@node_command("helm-values")
def helm_values_command(
    common: Common,
) -> int:
    """Print the Spegel chart values for this node.

    YAML by default, JSON with --output json. containerdMirrorAdd is false: spegel-node owns
    the hosts dir, so Spegel's init container must not rewrite it. Exit 0; when no containerd
    layout is found, the values for containerd's default paths, with a warning.

    Examples:

      spegel-node helm-values > spegel-values.yaml
    """
    from spegel_node.helm_values import fallback_layout, helm_values, to_yaml
    from spegel_node.layout import NoLayout
    from spegel_node.output import print_json
    from spegel_node.settings import load_settings

    try:
        settings, layout = _settings_and_layout(common)
    except NoLayout as e:  # SPEC: exit 0; plain containerd's default paths, and say so
        settings = load_settings(common.node, common.config, common.overrides)
        layout = fallback_layout(settings)
        print(
            f"spegel-node: warning: {e}; printed the values for containerd's default paths",
            file=sys.stderr,
        )
    values = helm_values(layout, settings)
    if common.output == "json":
        print_json(values)
    else:
        sys.stdout.write(to_yaml(values))
    return 0


@node_command("run")
def run_command(
    common: Common,
    no_gate: Annotated[
        bool, typer.Option("--no-gate", help="Advertise the mirror without probing /v2/.")
    ] = False,
    ready_file: Annotated[
        Optional[Path],
        typer.Option(
            "--ready-file",
            help="Write FILE (used as given) once the first apply is done; removed on exit.",
        ),
    ] = None,
    textfile: Annotated[
        Optional[Path],
        typer.Option(
            "--textfile",
            help="Also write doctor's results to FILE (used as given, atomically) as "
            "`doctor --textfile` does: at the first cycle, then at most once a minute, and "
            "after SIGHUP.",
        ),
    ] = None,
    doctor_only: Annotated[
        bool,
        typer.Option(
            "--doctor-only",
            help="Never write to the node: run doctor once a minute and log its failed "
            "checks (and --textfile). For Talos and Bottlerocket, whose mirrors live in the "
            "machine config or API settings.",
        ),
    ] = False,
) -> int:
    """Keep the node applied: watch the hosts dir, probe /v2/, repair at once.

    Watches the hosts dir and each registry dir (inotify) and runs apply within milliseconds
    of a change; probes the mirror's /v2/ every probe_interval and runs the gate on it. One
    key=value line per event on stderr. SIGTERM exits 0; SIGHUP reloads the config (a bad one
    is logged and the last good one kept). Exit 2 on a bad config at start. Under systemd
    (Type=notify) it sends READY=1 after the first apply.

    Examples:

      spegel-node run

      spegel-node run --root /host --ready-file /tmp/ready

      spegel-node run --textfile /var/lib/node_exporter/textfile/spegel_node.prom

      spegel-node run --root /host --doctor-only
    """
    from spegel_node.reconcile import run_reconciler

    return run_reconciler(
        common.node,
        lambda: _settings_and_layout(common),
        use_gate=not no_gate,
        ready_file=ready_file,
        textfile=textfile,
        doctor_only=doctor_only,
    )


@node_command("install-units")
def install_units_command(
    common: Common,
    unit_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--unit-dir",
            help="Where to write the units, used as given [default: /etc/systemd/system under --root].",
        ),
    ] = None,
    exec_path: Annotated[
        Optional[str],
        typer.Option(
            "--exec",
            help="The spegel-node executable on the node [default: the one running now].",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print a diff of the units; write nothing.")
    ] = False,
    mode: Annotated[
        UnitMode,
        typer.Option(
            "--mode",
            help="timer: repair service + timer + path unit; service: one Type=notify "
            "spegel-node.service running `run`.",
        ),
    ] = UnitMode.timer,
    textfile: Annotated[
        Optional[str],
        typer.Option(
            "--textfile",
            help="Also write spegel-node-doctor.timer + .service: `doctor --textfile FILE` "
            "every minute (FILE a node path, *.prom in node_exporter's textfile directory).",
        ),
    ] = None,
) -> int:
    """Write the systemd repair timer and path unit.

    They run apply for this node's hosts dir.

    Renders spegel-node-repair.service (hardened oneshot `apply`), .timer (30 s after boot,
    then every minute) and .path (one PathChanged= per mirrored registry's hosts.toml plus the
    hosts dir). Writes only the files that changed; does not run systemctl. Run it again after
    changing the registries or the hosts dir.

    Examples:

      spegel-node install-units && systemctl daemon-reload && systemctl enable --now spegel-node-repair.timer spegel-node-repair.path

      spegel-node install-units --dry-run --exec /opt/spegel-node/bin/spegel-node
    """
    from spegel_node.apply import hosts_dir_of
    from spegel_node.units import install_report, install_units

    settings, layout = _settings_and_layout(common)
    result = install_units(
        common.node,
        hosts_dir_of(layout),
        settings.registries,
        exec_path=exec_path,
        unit_dir=unit_dir,
        config=None if common.config is None else common.node.display(common.config.absolute()),
        distro_owned=layout.flavor if layout.distro_owned else None,
        dry_run=dry_run,
        mode=UnitMode(mode).value,
        textfile=textfile,
    )
    install_report(result, common.output)
    return 0


@node_command("configure-containerd")
def configure_containerd_command(
    common: Common,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the change as a diff; write nothing.")
    ] = False,
) -> int:
    """Make containerd read the hosts dir and keep layers.

    Sets config_path (the hosts dir) and discard_unpacked_layers = false in containerd's config.

    Plain containerd and kind: edits the config file in place, keeping everything else (or
    creates it); on containerd 1.x the keys go into the last file that sets a CRI table, since
    such a file replaces the table of earlier ones. k0s: writes the drop-in
    /etc/k0s/containerd.d/spegel-node.toml. Nothing to do (exit 0, says why) on k3s, RKE2 and
    MicroK8s (they set config_path themselves). Refuses (exit 1) on Talos, Bottlerocket and EKS
    (prints what to set instead) and when registry.mirrors is set. Writes nothing when already right. containerd reads its
    config only at start: restart it when the result says restart_required.

    Examples:

      spegel-node configure-containerd --dry-run

      spegel-node configure-containerd --output json && systemctl restart containerd
    """
    from spegel_node.apply import hosts_dir_of, mirror_hosts
    from spegel_node.containerd_setup import (
        NothingToConfigure,
        configure_containerd,
        nothing_to_configure_report,
        setup_report,
    )

    settings, layout = _settings_and_layout(common)
    urls = [m.url for m in mirror_hosts(settings)] if layout.distro_owned else []
    try:
        outcome = configure_containerd(
            common.node,
            layout,
            hosts_dir_of(layout),
            override=settings.hosts_dir,
            mirror_urls=urls,
            dry_run=dry_run,
        )
    except NothingToConfigure as e:  # k3s, RKE2, MicroK8s set it themselves: nothing to do
        nothing_to_configure_report(e, layout.flavor, dry_run, common.output)
        return 0
    setup_report(outcome, common.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; expected failures become one line on stderr and their exit code."""
    # A closed stdout or stderr (`>&-`) leaves them None: the work is still done, its words lost.
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    from spegel_node.redact import RedactingStream

    out, err = sys.stdout, sys.stderr  # every output goes through redact.py (issue 11)
    sys.stdout, sys.stderr = RedactingStream(out), RedactingStream(err)
    try:
        return _run_main(argv)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        sys.stdout, sys.stderr = out, err


def _run_main(argv: list[str] | None) -> int:
    command = typer.main.get_command(app)
    if "_SPEGEL_NODE_COMPLETE" in os.environ:  # a shell asking for completions (`completion`)
        from typer._completion_classes import completion_init

        completion_init()
    try:
        result = command.main(args=argv, prog_name="spegel-node", standalone_mode=False)
    except SpegelNodeError as e:
        print(f"spegel-node: error: {e}", file=sys.stderr)
        return e.exit_code
    except typer.Abort:
        print("spegel-node: aborted", file=sys.stderr)
        return 130
    except _usage_exception() as e:  # usage errors: bad option, missing argument, bad value
        print(f"spegel-node: error: {e.format_message()}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as e:  # an I/O failure no code path turned into a message: still one line
        where = f": {e.filename}" if e.filename else ""
        print(f"spegel-node: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0

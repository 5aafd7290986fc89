"""`spegel-node doctor`: a read-only diagnosis of the whole chain, from the containerd layout to
Spegel answering, as independent checks with stable ids (docs/checks.md lists them).

    facts (lazy, cached, read-only)  ->  build_checks  ->  run_checks (concurrent, bounded)
    ->  report (table / lines / JSON)  and the optional Prometheus textfile
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from spegel_node.doctor.build import KNOWN_IDS, build_checks
from spegel_node.doctor.checks.layout import LayoutDetected
from spegel_node.doctor.facts import Facts, Timeouts
from spegel_node.doctor.imageref import parse_image_ref
from spegel_node.doctor.promtext import render_textfile, write_textfile
from spegel_node.doctor.render import print_report
from spegel_node.doctor.runner import Run, build_and_run, ignore_checks, matches, run_checks
from spegel_node.errors import BadInput, NeedsRoot
from spegel_node.node import STATE_DIR, Node
from spegel_node.settings import load_settings

__all__ = ["Facts", "Run", "Timeouts", "build_checks", "diagnose", "run_checks", "run_doctor"]


def diagnose(facts: Facts) -> Run:
    """Build and run the checks under one deadline and crash guard; the duration covers both."""
    layout = LayoutDetected()
    first = (layout.id, layout.area)
    return build_and_run(build_checks, facts, facts.timeouts.deadline_s, first=first)


def _unreadable_dirs(facts: Facts) -> list[str]:
    """The hosts dir and the state dir, when they exist and this user may not list them (the
    checks would each report it)."""
    found = []
    for path in (facts.hosts_dir, STATE_DIR):
        real = facts.node.path(path)
        if os.path.isdir(real) and not os.access(real, os.R_OK | os.X_OK):
            found.append(path)
    return found


def unknown_patterns(patterns: Sequence[str], node_ids: Sequence[str]) -> list[str]:
    """The `--ignore` patterns that match no check of this node and no known check id."""
    known = [*node_ids, *KNOWN_IDS]
    return [p for p in dict.fromkeys(patterns) if not any(matches(i, p) for i in known)]


def run_doctor(
    node: Node,
    *,
    config: Path | None,
    overrides: dict[str, str | None],
    output: str,
    image: str | None = None,
    textfile: Path | None = None,
    stream: TextIO | None = None,
    ignore: Sequence[str] = (),
) -> int:
    """The `doctor` command: exit 0 when no check failed, 1 otherwise (2 for bad input).

    Checks matching an `ignore` pattern still run and are shown, marked ignored; they do not
    fail the exit code, `ok` or the summary's counts."""
    if textfile is not None and not textfile.parent.is_dir():
        raise BadInput(f"--textfile {textfile}: directory {textfile.parent} does not exist")
    settings = load_settings(node, config, overrides)  # BadInput: exit 2, nothing run
    ref = parse_image_ref(image) if image is not None else None
    options = [("--config", str(config.absolute()))] if config is not None else []
    options += [("--" + key.replace("_", "-"), v) for key, v in overrides.items() if v]
    facts = Facts(node, settings, image=ref, command_options=options)
    run = ignore_checks(diagnose(facts), ignore)
    denied = list(run.denied)
    if os.geteuid() != 0:
        socket = facts.socket if facts.layout is not None else None
        if socket is not None and socket.state == "denied" and facts.layout is not None:
            denied.insert(0, facts.layout.containerd_socket)
        denied += _unreadable_dirs(facts)
    if denied:  # a non-root run: say it once instead of a report of crashed checks
        raise NeedsRoot(denied)
    for pattern in unknown_patterns(ignore, [r.id for r in run.results]):
        print(
            f"spegel-node: warning: --ignore {pattern!r} matches no known check id "
            "(docs/checks.md lists them)",
            file=sys.stderr,
        )
    print_report(run, facts.flavor, facts.mirror_url, output, stream or sys.stdout)
    if textfile is not None:
        write_textfile(textfile, render_textfile(run.results, run.duration_s, time.time(), run.ok))
    return 0 if run.ok else 1

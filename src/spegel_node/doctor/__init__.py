"""`spegel-node doctor`: a read-only diagnosis of the whole chain, from the containerd layout to
Spegel answering, as independent checks with stable ids (docs/checks.md lists them).

    facts (lazy, cached, read-only)  ->  build_checks  ->  run_checks (concurrent, bounded)
    ->  report (table / lines / JSON)  and the optional Prometheus textfile
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from spegel_node.doctor.build import KNOWN_IDS, build_checks
from spegel_node.doctor.facts import Facts, Timeouts
from spegel_node.doctor.imageref import parse_image_ref
from spegel_node.doctor.promtext import render_textfile, write_atomic
from spegel_node.doctor.render import print_report
from spegel_node.doctor.runner import Run, ignore_checks, matches, run_checks
from spegel_node.errors import BadInput
from spegel_node.node import Node
from spegel_node.settings import load_settings

__all__ = ["Facts", "Run", "Timeouts", "build_checks", "diagnose", "run_checks", "run_doctor"]


def diagnose(facts: Facts) -> Run:
    """Build and run the checks; the duration covers both."""
    started = time.monotonic()
    checks = build_checks(facts)
    run = run_checks(
        checks, facts, max(0.1, facts.timeouts.deadline_s - (time.monotonic() - started))
    )
    return Run(run.results, round(time.monotonic() - started, 3))


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
    facts = Facts(node, settings, image=ref)
    run = ignore_checks(diagnose(facts), ignore)
    for pattern in unknown_patterns(ignore, [r.id for r in run.results]):
        print(
            f"spegel-node: warning: --ignore {pattern!r} matches no known check id "
            "(docs/checks.md lists them)",
            file=sys.stderr,
        )
    print_report(run, facts.flavor, facts.mirror_url, output, stream or sys.stdout)
    if textfile is not None:
        write_atomic(textfile, render_textfile(run.results, run.duration_s, time.time(), run.ok))
    return 0 if run.ok else 1

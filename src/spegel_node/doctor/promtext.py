"""Prometheus text format: read Spegel's metrics (just enough), write doctor's textfile.

Textfile scheme (node_exporter textfile collector), one state set per check:

    spegel_node_check_status{id="spegel.v2",status="pass"} 0
    spegel_node_check_status{id="spegel.v2",status="warn"} 0
    spegel_node_check_status{id="spegel.v2",status="fail"} 1
    spegel_node_check_status{id="spegel.v2",status="skip"} 0
    spegel_node_check_duration_seconds{id="spegel.v2"} 0.004
    spegel_node_doctor_ok 0
    spegel_node_doctor_checks{status="fail"} 1          (one per status)
    spegel_node_doctor_duration_seconds 0.41
    spegel_node_doctor_last_run_timestamp_seconds 1.7e+09

Alert on `spegel_node_check_status{status="fail"} == 1`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from spegel_node import fsutil
from spegel_node.doctor.model import CheckResult, Status
from spegel_node.errors import SpegelNodeError
from spegel_node.redact import redact_output

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+-?\d+)?\s*$"
)
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_samples(text: str) -> Iterator[Sample]:
    """The samples of a Prometheus text exposition; lines that do not parse are skipped."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        labels = {k: _unescape(v) for k, v in _LABEL.findall(m.group("labels") or "")}
        yield Sample(m.group("name"), labels, value)


def _unescape(value: str) -> str:
    return value.replace(r"\n", "\n").replace(r"\"", '"').replace("\\\\", "\\")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return repr(round(value, 6)) if not float(value).is_integer() else str(int(value))


def render_textfile(
    results: Sequence[CheckResult], duration_s: float, timestamp: float, ok: bool
) -> str:
    lines = [
        "# HELP spegel_node_check_status spegel-node doctor: 1 for the check's current status, "
        "0 for its other statuses.",
        "# TYPE spegel_node_check_status gauge",
    ]
    for r in results:
        for status in Status:
            value = 1 if r.status == status else 0
            lines.append(
                f'spegel_node_check_status{{id="{_escape(r.id)}",status="{status.value}"}} {value}'
            )
    lines += [
        "# HELP spegel_node_check_duration_seconds How long each doctor check took.",
        "# TYPE spegel_node_check_duration_seconds gauge",
    ]
    lines += [
        f'spegel_node_check_duration_seconds{{id="{_escape(r.id)}"}} {_number(r.duration_s)}'
        for r in results
    ]
    lines += [
        "# HELP spegel_node_doctor_ok 1 when no doctor check failed.",
        "# TYPE spegel_node_doctor_ok gauge",
        f"spegel_node_doctor_ok {1 if ok else 0}",
        "# HELP spegel_node_doctor_checks How many doctor checks ended in each status.",
        "# TYPE spegel_node_doctor_checks gauge",
    ]
    lines += [
        f'spegel_node_doctor_checks{{status="{s.value}"}} {sum(r.status == s for r in results)}'
        for s in Status
    ]
    lines += [
        "# HELP spegel_node_doctor_duration_seconds How long the whole doctor run took.",
        "# TYPE spegel_node_doctor_duration_seconds gauge",
        f"spegel_node_doctor_duration_seconds {_number(duration_s)}",
        "# HELP spegel_node_doctor_last_run_timestamp_seconds When doctor last ran (Unix time).",
        "# TYPE spegel_node_doctor_last_run_timestamp_seconds gauge",
        f"spegel_node_doctor_last_run_timestamp_seconds {_number(round(timestamp, 3))}",
    ]
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Replace `path` atomically (fsutil: its temp file starts with ".", so the collector, which
    reads *.prom only, skips it); mode 0644."""
    try:
        with fsutil.open_dir(path.parent) as dir_fd:
            data = redact_output(text).encode()  # the textfile is output too: one redaction place
            fsutil.replace_at(dir_fd, path.name, fsutil.UNCHECKED, data, mode=0o644)
    except OSError as e:
        raise SpegelNodeError(f"cannot write textfile {path}: {e.strerror or e}") from e

"""The checks, one module per area. Each check: its inputs as fields, one `run(facts)`."""

from __future__ import annotations

from spegel_node.doctor.model import Check, CheckResult

NO_LAYOUT = "no containerd layout (see layout.detected)"


def no_layout(check: Check) -> CheckResult:
    return check.skip(NO_LAYOUT)

"""Run every check at once, each on its own daemon thread, under one overall deadline.

Daemon threads, not an executor: a probe stuck past its own timeout must not keep the process
alive. A check that raises becomes its own `fail` result; a check still running at the deadline
becomes a `fail` "did not finish". Results come back in the checks' order, whatever the finish order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from spegel_node.compat import zip_strict
from spegel_node.doctor.facts import Facts
from spegel_node.doctor.model import Check, CheckResult, Status
from spegel_node.hoststoml import redact_text

BUG_FIX = "this is a bug in spegel-node: please report it with the output of `spegel-node doctor --output json`"


@dataclass(frozen=True)
class Run:
    results: tuple[CheckResult, ...]
    duration_s: float

    @property
    def ok(self) -> bool:
        return all(r.status is not Status.FAIL for r in self.results)

    def count(self, status: Status) -> int:
        return sum(r.status is status for r in self.results)


def _run_one(check: Check, facts: Facts) -> CheckResult:
    started = time.monotonic()
    try:
        result = check.run(facts)
    except Exception as e:  # one check's crash is its own result, never the end of the run
        message = redact_text(" ".join(str(e).split()))[:300]
        result = CheckResult(
            check.id,
            check.area,
            Status.FAIL,
            f"check crashed: {type(e).__name__}: {message}",
            BUG_FIX,
        )
    return replace(result, duration_s=round(time.monotonic() - started, 4))


def run_checks(checks: Sequence[Check], facts: Facts, deadline_s: float) -> Run:
    started = time.monotonic()
    results: list[CheckResult | None] = [None] * len(checks)
    done = threading.Condition()

    def work(index: int, check: Check) -> None:
        result = _run_one(check, facts)
        with done:
            results[index] = result
            done.notify_all()

    for index, check in enumerate(checks):
        threading.Thread(
            target=work, args=(index, check), name=f"doctor {check.id}", daemon=True
        ).start()
    end = started + deadline_s
    with done:
        while any(r is None for r in results):
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            done.wait(remaining)
        final = [
            r
            if r is not None
            else CheckResult(
                check.id,
                check.area,
                Status.FAIL,
                f"did not finish within {deadline_s:g}s",
                "something on the node hangs past every probe's own timeout; run the check's "
                "probe by hand (see docs/checks.md)",
                duration_s=round(time.monotonic() - started, 4),
            )
            for r, check in zip_strict(results, checks)
        ]
    return Run(tuple(final), round(time.monotonic() - started, 3))

"""Run every check at once, each on its own daemon thread, under one overall deadline.

Daemon threads, not an executor: a probe stuck past its own timeout must not keep the process
alive. A check that raises becomes its own `fail` result; a check still running at the deadline
becomes a `fail` "did not finish". Results come back in the checks' order, whatever the finish order.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from spegel_node.compat import zip_strict
from spegel_node.doctor.facts import Facts
from spegel_node.doctor.model import Check, CheckResult, Status
from spegel_node.doctor.remedy import cli_command
from spegel_node.errors import denied_to_non_root
from spegel_node.redact import redact_text

HANG_FIX = (
    "something on the node hangs past every probe's own timeout; run the check's probe by hand "
    "(see docs/checks.md)"
)
BUG_FIX = "this is a bug in spegel-node: please report it with the output of `spegel-node doctor --output json`"


@dataclass(frozen=True)
class Run:
    results: tuple[CheckResult, ...]
    duration_s: float
    # node paths a non-root run could not read (doctor then says once that it needs root)
    denied: tuple[str, ...] = field(default=(), compare=False)

    @property
    def ok(self) -> bool:
        """No check failed, ignored checks aside."""
        return all(r.status is not Status.FAIL or r.ignored for r in self.results)

    def count(self, status: Status) -> int:
        """Checks with this status that count (ignored checks do not)."""
        return sum(r.status is status and not r.ignored for r in self.results)

    @property
    def ignored(self) -> int:
        return sum(r.ignored for r in self.results)


def matches(check_id: str, pattern: str) -> bool:
    """`--ignore` patterns: a check id or a shell-style glob (`spegel.*`), case-sensitive."""
    return fnmatch.fnmatchcase(check_id, pattern)


def ignore_checks(run: Run, patterns: Iterable[str]) -> Run:
    """The same run with every result whose id matches one of `patterns` marked ignored."""
    patterns = tuple(patterns)
    if not patterns:
        return run
    results = tuple(
        replace(r, ignored=True) if any(matches(r.id, p) for p in patterns) else r
        for r in run.results
    )
    return replace(run, results=results)


def _run_one(check: Check, facts: Facts, denied: list[str] | None = None) -> CheckResult:
    started = time.monotonic()
    try:
        result = check.run(facts)
    except Exception as e:  # one check's crash is its own result, never the end of the run
        if denied is not None and denied_to_non_root(e):
            assert isinstance(e, OSError)
            denied.append(facts.node.display(e.filename or ""))
        result = _crashed(check.id, check.area, e, facts)
    return replace(result, duration_s=round(time.monotonic() - started, 4))


def _crashed(check_id: str, area: str, e: Exception, facts: Facts) -> CheckResult:
    message = redact_text(" ".join(str(e).split()))[:300]
    fix = BUG_FIX.replace(
        "spegel-node doctor --output json", cli_command(facts, "doctor --output json")
    )
    return CheckResult(
        check_id, area, Status.FAIL, f"check crashed: {type(e).__name__}: {message}", fix
    )


def build_and_run(
    build: Callable[[Facts], Sequence[Check]],
    facts: Facts,
    deadline_s: float,
    *,
    first: tuple[str, str],
) -> Run:
    """Build the checks, then run them, all under one deadline and one crash guard: building
    reads the layout too. A build that crashes or hangs is one `fail` result for `first` (the
    id and area of the check that reports the layout)."""
    started = time.monotonic()
    built: list[Sequence[Check] | Exception] = []
    finished = threading.Event()

    def work() -> None:
        try:
            built.append(build(facts))
        except Exception as e:  # the same guard as a check's
            built.append(e)
        finished.set()

    threading.Thread(target=work, name="doctor build", daemon=True).start()
    if not finished.wait(deadline_s):
        result = CheckResult(
            *first, Status.FAIL, f"reading the node did not finish within {deadline_s:g}s", HANG_FIX
        )
        return Run((result,), round(time.monotonic() - started, 3))
    outcome = built[0]
    if isinstance(outcome, Exception):
        return Run((_crashed(*first, outcome, facts),), round(time.monotonic() - started, 3))
    run = run_checks(outcome, facts, max(0.1, deadline_s - (time.monotonic() - started)))
    return Run(run.results, round(time.monotonic() - started, 3), run.denied)


LOCAL_THREADS = 4  # the GIL runs local checks one at a time anyway: more threads only cost


def _batches(checks: Sequence[Check]) -> list[list[tuple[int, Check]]]:
    """Every check on its own thread, except the local ones (file reads only), which share a
    few threads: their results come in as each finishes, in any order."""
    own = [[(i, c)] for i, c in enumerate(checks) if not c.local]
    local = [(i, c) for i, c in enumerate(checks) if c.local]
    shared = [local[n::LOCAL_THREADS] for n in range(LOCAL_THREADS)]
    return own + [b for b in shared if b]


def run_checks(checks: Sequence[Check], facts: Facts, deadline_s: float) -> Run:
    started = time.monotonic()
    results: list[CheckResult | None] = [None] * len(checks)
    done = threading.Condition()
    denied: list[str] = []

    def work(batch: list[tuple[int, Check]]) -> None:
        for index, check in batch:
            result = _run_one(check, facts, denied)
            with done:
                results[index] = result
                done.notify_all()

    for batch in _batches(checks):
        name = f"doctor {batch[0][1].id}" + (f" (+{len(batch) - 1})" if len(batch) > 1 else "")
        threading.Thread(target=work, args=(batch,), name=name, daemon=True).start()
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
                HANG_FIX,
                duration_s=round(time.monotonic() - started, 4),
            )
            for r, check in zip_strict(results, checks)
        ]
        return Run(tuple(final), round(time.monotonic() - started, 3), tuple(denied))

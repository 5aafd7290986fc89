"""What a check is and what it returns.

A check is a small object holding its inputs as fields, with one method, `run(facts)`, that
returns a `CheckResult`. It never prints and never raises on purpose: the runner turns a crash
into that check's own `fail` result. Building the list of checks (`build.build_checks`) is
separate from running it (`runner.run_checks`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from spegel_node.compat import StrEnum

if TYPE_CHECKING:
    from spegel_node.doctor.facts import Facts


class Status(StrEnum):
    """A check's outcome. Only `fail` makes `doctor` exit 1."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


AREAS = ("layout", "containerd", "hosts", "spegel", "k3s", "agent")


@dataclass(frozen=True)
class CheckResult:
    id: str
    area: str
    status: Status
    summary: str  # one line
    remediation: str = ""  # what to change, pasteable; empty when the check passed
    details: tuple[str, ...] = ()  # more lines (findings, figures), never credentials
    duration_s: float = 0.0
    ignored: bool = False  # `doctor --ignore`: still run and shown, never fails the run

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "area": self.area,
            "status": self.status.value,
            "summary": self.summary,
            "remediation": self.remediation,
            "details": list(self.details),
            "duration_s": self.duration_s,
            "ignored": self.ignored,
        }


class Check(ABC):
    """One diagnosis with a stable id (`spegel.v2`, `hosts.docker.io`)."""

    area: ClassVar[str]
    # True for a check that only reads local files (no network, no programs): the runner may
    # run many of them on one thread (5,000 registries are 5,000 checks, not 5,000 threads)
    local: ClassVar[bool] = False

    @property
    @abstractmethod
    def id(self) -> str: ...

    @abstractmethod
    def run(self, facts: Facts) -> CheckResult: ...

    # -- result helpers, so every check reads as: return self.fail("...", "fix: ...")

    def result(
        self, status: Status, summary: str, remediation: str = "", details: Sequence[str] = ()
    ) -> CheckResult:
        return CheckResult(self.id, self.area, status, summary, remediation, tuple(details))

    def passed(self, summary: str, details: Sequence[str] = ()) -> CheckResult:
        return self.result(Status.PASS, summary, "", details)

    def warn(self, summary: str, remediation: str, details: Sequence[str] = ()) -> CheckResult:
        return self.result(Status.WARN, summary, remediation, details)

    def fail(self, summary: str, remediation: str, details: Sequence[str] = ()) -> CheckResult:
        return self.result(Status.FAIL, summary, remediation, details)

    def skip(self, summary: str, details: Sequence[str] = ()) -> CheckResult:
        return self.result(Status.SKIP, summary, "", details)

"""Write docs/monitoring/spegel-node.rules.yml: the PrometheusRule's spec.groups, for a
Prometheus without the Operator (`rule_files:`) and for `promtool check rules`.

The PrometheusRule in docs/flux is the one source; tests/test_monitoring.py fails when this
file is not what `python3 scripts/monitoring_rules.py` writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCE = (
    REPO / "docs/flux/kubernetes/main/apps/kube-system/spegel-node/monitoring/prometheusrule.yaml"
)
TARGET = REPO / "docs/monitoring/spegel-node.rules.yml"
HEADER = (
    "# Generated from docs/flux/kubernetes/main/apps/kube-system/spegel-node/monitoring/"
    "prometheusrule.yaml\n# by `python3 scripts/monitoring_rules.py`: edit that file, not this one.\n"
)


def render() -> str:
    rule = yaml.safe_load(SOURCE.read_text())
    body = yaml.safe_dump(
        {"groups": rule["spec"]["groups"]}, sort_keys=False, width=100, allow_unicode=True
    )
    return HEADER + body


def main() -> int:
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

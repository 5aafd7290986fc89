"""The monitoring half of docs/flux: the PrometheusRule (and its plain rules file), the Grafana
dashboard, and the Spegel chart's own ServiceMonitor and dashboard.

Every metric an alert or a panel reads must exist: spegel-node's in real `doctor --textfile`
output from a fake node, Spegel's in Spegel v0.7.3's source, node_exporter's listed here. Every
alert is run by `promtool test rules` on series that fire it and series that must not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import run_cli
from support.fake_nodes import make_containerd, write
from support.peers import helm_template, spegel_module
from support.sandbox import free_port

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "docs/flux/kubernetes/main/apps/kube-system/spegel-node/monitoring"
PROMETHEUSRULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES_FILE = REPO / "docs/monitoring/spegel-node.rules.yml"
RULE_TESTS = REPO / "docs/monitoring/spegel-node.rules.test.yml"
HELMRELEASE = REPO / "docs/flux/kubernetes/main/apps/kube-system/spegel/app/helmrelease.yaml"
# node_exporter's own textfile collector series (collector/textfile.go), the only non-Spegel,
# non-spegel-node metrics the rules and the dashboard may read.
NODE_EXPORTER = {"node_textfile_mtime_seconds", "node_textfile_scrape_error"}
# Spegel's metrics the rules and the dashboard read; each is checked against Spegel's source.
SPEGEL = {"spegel_mirror_requests_total", "spegel_mirror_last_success_timestamp_seconds"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}

sys.path.insert(0, str(REPO / "scripts"))
import monitoring_rules  # noqa: E402

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package: prometheus)"
)


# --- PromQL: which metrics and check ids an expression reads ------------------------------------


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by
    `(`), keywords, label names (inside `{}` or a by/on list) or durations (inside `[]`)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        if m.group(2) or m.group(1) in KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def id_matchers(expr: str) -> list[tuple[str, str]]:
    """The `id` label matchers: (operator, value) with PromQL's string escapes undone."""
    return [
        (op, value.encode().decode("unicode_escape"))
        for op, value in re.findall(r'\bid\s*(=~|!~|=|!=)\s*"((?:[^"\\]|\\.)*)"', expr)
    ]


def test_metric_names_parser() -> None:
    expr = (
        'sum by (namespace) (rate(spegel_mirror_requests_total{cache="hit"}[1h])) / '
        'time() - x_total offset 5m > 0.2 and on(instance) up{job="a b"} == 1 or vector(0)'
    )
    assert metric_names(expr) == {"spegel_mirror_requests_total", "x_total", "up"}
    assert id_matchers('m{id=~"hosts\\\\..+",status="fail"}') == [("=~", "hosts\\..+")]


@pytest.fixture
def real_textfile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, set[str]]:
    """Metric names and check ids of `doctor --textfile` on a fake plain-containerd node
    (applied, Spegel not answering)."""
    root = tmp_path / "node"
    make_containerd(root, config_path="/etc/containerd/certs.d")
    write(
        root,
        "/etc/spegel-node/config.toml",
        f'node_ip = "127.0.0.1"\nhost_port = {free_port()}\n',
    )
    out = tmp_path / "spegel_node.prom"
    assert run_cli(capsys, "apply", "--no-gate", "--root", str(root)).code == 0
    result = run_cli(capsys, "doctor", "--root", str(root), "--textfile", str(out))
    assert result.code == 1, result.err  # spegel.v2 fails: nothing listens
    names: set[str] = set()
    ids: set[str] = set()
    for line in out.read_text().splitlines():
        if line.startswith("#"):
            continue
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
        assert name, line
        names.add(name.group(0))
        ids.update(re.findall(r'\bid="([^"]*)"', line))
    assert {"agent.gate", "agent.drift", "hosts.docker.io", "spegel.v2"} <= ids
    return {"names": names, "ids": ids}


def check_expr(expr: str, real: dict[str, set[str]], where: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    for name in names:
        if name.startswith("spegel_node_"):
            assert name in real["names"], f"{where}: {name} is not in doctor's textfile"
        else:
            assert name in SPEGEL | NODE_EXPORTER, f"{where}: {name} is not a known metric"
    for op, value in id_matchers(expr):
        if op == "=":
            assert value in real["ids"], f"{where}: no doctor check has id {value!r}"
        elif op == "=~":
            assert any(re.fullmatch(value, i) for i in real["ids"]), f"{where}: {value!r}"


def test_spegel_metric_names_are_spegels(chart_module: Path) -> None:
    source = (chart_module / "pkg/metrics/metrics.go").read_text()
    for name in SPEGEL:
        assert f'Name: "{name}"' in source, name


@pytest.fixture(scope="module")
def chart_module() -> Path:
    return spegel_module()


# --- the rules ------------------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(PROMETHEUSRULE.read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def test_prometheusrule_shape() -> None:
    doc = yaml.safe_load(PROMETHEUSRULE.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "kube-system"
    assert "./prometheusrule.yaml" in kustomization["resources"]
    (generator,) = kustomization["configMapGenerator"]
    assert generator["options"]["labels"] == {"grafana_dashboard": "1"}
    assert generator["files"] == ["spegel-node.json=./grafana-dashboard.json"]
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names)) >= 6
    for rule in rules():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_plain_rules_file_is_the_prometheusrules_groups() -> None:
    assert RULES_FILE.read_text() == monitoring_rules.render(), (
        "docs/monitoring/spegel-node.rules.yml is stale: python3 scripts/monitoring_rules.py"
    )
    plain = yaml.safe_load(RULES_FILE.read_text())
    assert plain == {"groups": yaml.safe_load(PROMETHEUSRULE.read_text())["spec"]["groups"]}


def test_every_metric_in_the_rules_exists(real_textfile: dict[str, set[str]]) -> None:
    for rule in rules():
        check_expr(rule["expr"], real_textfile, rule["alert"])


@needs_promtool
def test_promtool_check_rules() -> None:
    proc = subprocess.run(
        ["promtool", "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


# One scenario per alert: series (promtool's expanding notation, 1m steps), when to look, and
# which label sets must be firing then; the other series in it must not fire.
NODE_A = {"instance": "node-a:9100", "job": "node-exporter"}
NODE_B = {"instance": "node-b:9100", "job": "node-exporter"}


def status(check_id: str, state: str, node: dict[str, str]) -> dict[str, str]:
    return {"__name__": "spegel_node_check_status", "id": check_id, "status": state, **node}


SCENARIOS: dict[str, dict[str, Any]] = {
    "SpegelNodeMirrorWithdrawn": {
        "series": [
            (status("agent.gate", "warn", NODE_A), "1x20"),
            (status("agent.gate", "warn", NODE_B), "1x5 0x15"),  # counting up, then back
            (status("agent.gate", "pass", NODE_B), "0x5 1x15"),
        ],
        "at": "12m",
        "firing": [status("agent.gate", "warn", NODE_A)],
        "not_yet": "9m",
    },
    "SpegelNodeHostsTomlBroken": {
        "series": [
            (status("hosts.docker.io", "fail", NODE_A), "1x20"),
            (status("hosts.ghcr.io", "fail", NODE_A), "0x20"),
            (status("hosts.docker.io", "fail", NODE_B), "1x3 0x17"),  # repaired within 5m
            (status("containerd.config_path", "fail", NODE_B), "1x20"),  # not a hosts check
        ],
        "at": "7m",
        "firing": [status("hosts.docker.io", "fail", NODE_A)],
        "not_yet": "4m",
    },
    "SpegelNodeDriftNotRepaired": {
        "series": [
            (status("agent.drift", "fail", NODE_A), "1x20"),
            (status("agent.drift", "fail", NODE_B), "1x2 0x18"),  # the path unit repaired it
            (status("agent.drift", "warn", NODE_B), "1x20"),
        ],
        "at": "8m",
        "firing": [status("agent.drift", "fail", NODE_A)],
        "not_yet": "4m",
    },
    "SpegelNodeCheckFailing": {
        "series": [
            (status("containerd.config_path", "fail", NODE_A), "1x30"),
            (status("hosts.docker.io", "fail", NODE_A), "1x30"),  # has its own alert
            (status("agent.drift", "fail", NODE_A), "1x30"),  # has its own alert
            (status("containerd.config_path", "fail", NODE_B), "0x30"),
        ],
        "at": "20m",
        "firing": [status("containerd.config_path", "fail", NODE_A)],
        "not_yet": "14m",
    },
    "SpegelNodeTextfileStale": {
        "series": [
            # node A: doctor stopped at t=0 (file and timestamp frozen); node B: every minute
            (
                {"__name__": "node_textfile_mtime_seconds", "file": "/var/lib/t/spegel_node.prom"}
                | NODE_A,
                "0x30",
            ),
            ({"__name__": "spegel_node_doctor_last_run_timestamp_seconds"} | NODE_A, "0x30"),
            (
                {"__name__": "node_textfile_mtime_seconds", "file": "/var/lib/t/spegel_node.prom"}
                | NODE_B,
                "0+60x30",
            ),
            ({"__name__": "spegel_node_doctor_last_run_timestamp_seconds"} | NODE_B, "0+60x30"),
            # another textfile, never refreshed: not ours
            (
                {"__name__": "node_textfile_mtime_seconds", "file": "/var/lib/t/other.prom"}
                | NODE_B,
                "0x30",
            ),
        ],
        "at": "12m",
        "firing": [
            {"file": "/var/lib/t/spegel_node.prom", **NODE_A},
            dict(NODE_A),
        ],
        "not_yet": "9m",
    },
    "SpegelHitRatioLow": {
        "series": [
            # kube-system: 1 hit and 10 misses a minute (9%): fires
            (
                {
                    "__name__": "spegel_mirror_requests_total",
                    "namespace": "kube-system",
                    "pod": "spegel-1",
                    "registry": "docker.io",
                    "cache": "hit",
                },
                "0+1x150",
            ),
            (
                {
                    "__name__": "spegel_mirror_requests_total",
                    "namespace": "kube-system",
                    "pod": "spegel-1",
                    "registry": "docker.io",
                    "cache": "miss",
                },
                "0+10x150",
            ),
            # quiet: all misses but under 100 requests an hour (a first pull)
            (
                {
                    "__name__": "spegel_mirror_requests_total",
                    "namespace": "quiet",
                    "pod": "spegel-2",
                    "registry": "ghcr.io",
                    "cache": "miss",
                },
                "0+1x150",
            ),
            (
                {
                    "__name__": "spegel_mirror_requests_total",
                    "namespace": "quiet",
                    "pod": "spegel-2",
                    "registry": "ghcr.io",
                    "cache": "hit",
                },
                "0x150",
            ),
            # busy: 10 hits and 1 miss a minute: fine
            (
                {
                    "__name__": "spegel_mirror_requests_total",
                    "namespace": "busy",
                    "pod": "spegel-3",
                    "registry": "quay.io",
                    "cache": "hit",
                },
                "0+10x150",
            ),
            (
                {
                    "__name__": "spegel_mirror_requests_total",
                    "namespace": "busy",
                    "pod": "spegel-3",
                    "registry": "quay.io",
                    "cache": "miss",
                },
                "0+1x150",
            ),
        ],
        "at": "100m",
        "firing": [{"namespace": "kube-system"}],
        "value": 1 / 11,
        "not_yet": "20m",
    },
}


def series_text(labels: dict[str, str]) -> str:
    name = labels["__name__"]
    rest = ",".join(f'{k}="{v}"' for k, v in labels.items() if k != "__name__")
    return f"{name}{{{rest}}}"


def humanize_percentage(value: float) -> str:
    return f"{value * 100:.4g}%"


def expand(template: str, labels: dict[str, str], value: float | None) -> str:
    """The two template forms the annotations use, as Prometheus expands them."""

    def one(m: re.Match[str]) -> str:
        inner = m.group(1).strip()
        if inner.startswith("$labels."):
            return labels[inner.removeprefix("$labels.")]
        if inner == "$value | humanizePercentage" and value is not None:
            return humanize_percentage(value)
        raise AssertionError(f"template {inner!r} not handled by this test")

    return re.sub(r"\{\{(.*?)\}\}", one, template)


def promtool_tests(drop_one: bool = False) -> dict[str, Any]:
    by_name = {r["alert"]: r for r in rules()}
    tests = []
    for alert, scenario in SCENARIOS.items():
        rule = by_name[alert]
        expected = []
        for labels in scenario["firing"]:
            labels = {k: v for k, v in labels.items() if k != "__name__"}
            expected.append(
                {
                    "exp_labels": {**labels, **rule["labels"]},
                    "exp_annotations": {
                        k: expand(v, labels, scenario.get("value"))
                        for k, v in rule["annotations"].items()
                    },
                }
            )
        if drop_one:
            expected = expected[1:]
        tests.append(
            {
                "name": alert,
                "interval": "1m",
                "input_series": [
                    {"series": series_text(labels), "values": values}
                    for labels, values in scenario["series"]
                ],
                "alert_rule_test": [
                    {"eval_time": scenario["not_yet"], "alertname": alert, "exp_alerts": []},
                    {"eval_time": scenario["at"], "alertname": alert, "exp_alerts": expected},
                ],
            }
        )
    rule_file = str(RULES_FILE) if drop_one else RULES_FILE.name  # relative: beside the tests
    return {"rule_files": [rule_file], "evaluation_interval": "1m", "tests": tests}


def promtool_tests_text() -> str:
    return (
        "# promtool test rules docs/monitoring/spegel-node.rules.test.yml\n"
        "# Generated by tests/test_monitoring.py from its SCENARIOS (series that fire each alert\n"
        "# and series that must not); rewrite with SPEGEL_NODE_WRITE_RULE_TESTS=1 pytest "
        "tests/test_monitoring.py\n" + yaml.safe_dump(promtool_tests(), sort_keys=False, width=100)
    )


def test_every_alert_has_a_scenario() -> None:
    assert sorted(SCENARIOS) == sorted(r["alert"] for r in rules())


@needs_promtool
def test_promtool_test_rules_fire_and_do_not_fire(tmp_path: Path) -> None:
    if os.environ.get("SPEGEL_NODE_WRITE_RULE_TESTS") == "1":
        RULE_TESTS.write_text(promtool_tests_text())
    assert RULE_TESTS.read_text() == promtool_tests_text(), (
        f"{RULE_TESTS.relative_to(REPO)} is stale: SPEGEL_NODE_WRITE_RULE_TESTS=1 pytest "
        "tests/test_monitoring.py"
    )
    proc = subprocess.run(
        ["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
    spec = tmp_path / "spegel-node.test.yml"
    # the same tests missing one expected alert each must fail: promtool really compares
    spec.write_text(yaml.safe_dump(promtool_tests(drop_one=True), sort_keys=False))
    proc = subprocess.run(
        ["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for alert in SCENARIOS:
        assert alert in proc.stdout + proc.stderr, alert


# --- the dashboard ----------------------------------------------------------------------------


def dashboard_exprs() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    found = [
        (panel["title"], target["expr"])
        for panel in doc["panels"]
        for target in panel.get("targets", [])
    ]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", var["definition"])
            assert m, var["definition"]
            found.append((f"${var['name']}", m.group(1)))
    return found


def test_dashboard_is_a_grafana_dashboard() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "spegel-node" and doc["title"]
    assert isinstance(doc["schemaVersion"], int)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    for panel in doc["panels"]:
        assert panel["type"] in {"stat", "table", "timeseries"}
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["targets"], panel["title"]
        assert {t["refId"] for t in panel["targets"]} == {
            chr(65 + i) for i in range(len(panel["targets"]))
        }
    names = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "instance"} <= names


def test_every_metric_in_the_dashboard_exists(real_textfile: dict[str, set[str]]) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for title, expr in exprs:
        check_expr(expr, real_textfile, title)


# --- Spegel's own monitoring, from the chart --------------------------------------------------


def test_helmrelease_enables_the_charts_servicemonitor_and_dashboard(chart_module: Path) -> None:
    values = yaml.safe_load(HELMRELEASE.read_text())["spec"]["values"]
    assert values["serviceMonitor"]["enabled"] is True
    dashboard = values["grafanaDashboard"]
    assert dashboard["enabled"] is True
    assert dashboard.get("mode", "Sidecar") == "Sidecar"
    assert dashboard["labels"] == {"grafana_dashboard": "1"}  # what our ConfigMap carries too
    chart_values = yaml.safe_load((chart_module / "charts/spegel/values.yaml").read_text())
    for key in ("serviceMonitor", "grafanaDashboard"):
        assert set(values[key]) <= set(chart_values[key]), key


def test_chart_renders_its_dashboard_configmap_with_the_label(
    chart_module: Path, tmp_path: Path
) -> None:
    values = yaml.safe_load(HELMRELEASE.read_text())["spec"]["values"]
    values["serviceMonitor"]["enabled"] = False  # the CRD is not there for helm template
    docs = helm_template(
        chart_module / "charts/spegel", values, tmp_path, "--namespace", "kube-system"
    )
    (configmap,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")
    ]
    assert configmap["metadata"]["namespace"] == "kube-system"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["spegel.json"])["panels"]

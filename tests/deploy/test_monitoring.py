"""The shipped monitoring: alert rules that promtool accepts and whose unit tests pass, the
Prometheus Operator copies of them, and a dashboard covering what an operator watches.

promtool comes from Debian's ``prometheus`` package, installed by ``make test`` like the
suite's other servers; these tests skip only where it could not be installed. Whether a
running daemon exports every metric used here is checked in tests/e2e/test_observability.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian package prometheus; `make test` installs it "
    "where apt-get can)",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120, check=False
    )


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
def test_each_alert_fires_and_stays_quiet_as_its_unit_tests_say():
    result = promtool("test", "rules", "alerts.test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {r["alert"] for r in rules()}, "every alert has a case where it fires"


@needs_promtool
def test_a_broken_expectation_fails_promtool(tmp_path):
    """The unit tests can fail: flip one expected label and promtool must say so."""
    tests = yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())
    tests["rule_files"] = [str(ALERTS)]
    tests["tests"][0]["alert_rule_test"][-1]["exp_alerts"][0]["exp_labels"]["pipeline"] = "good"
    broken = tmp_path / "broken.test.yaml"
    broken.write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", str(broken))
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_the_operator_rule_holds_the_same_alerts():
    (rule,) = list(yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text()))
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_the_service_monitor_scrapes_the_metrics_service():
    (monitor,) = list(yaml.safe_load_all((MONITORING / "servicemonitor.yaml").read_text()))
    (service,) = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/service.yaml").read_text()))
    assert monitor["kind"] == "ServiceMonitor"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_the_dashboard_shows_what_an_operator_watches():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    wanted = {
        "Lag": "syncd_lag_seconds",
        "Throughput by operation": "syncd_events_applied_total",
        "Stage latency (p95)": "syncd_stage_seconds_bucket",
        "Retries": "syncd_retries_total",
        "Dead letters": "syncd_dead_letters_total",
        "Drift (sampled)": "syncd_drift_records",
        "State": "syncd_pipeline_state",
        "Rebuild phase": "syncd_rebuild_phase",
        "Rebuild progress and lag": "syncd_rebuild_lag_seconds",
    }
    for title, metric in wanted.items():
        assert metric in exprs.get(title, ""), title
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert names == {"datasource", "pipeline"}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]

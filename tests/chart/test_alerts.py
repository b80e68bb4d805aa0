"""deploy/prometheus: the PrometheusRule and the plain rules file agree, every
expression names only CONTRACTS.md metrics, and the alerts fire (and only
fire) when they should - promtool's rule unit tests in alerts_test.yaml."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from chartlib import REPO
from promql import check

PROM = REPO / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def plain():
    return yaml.safe_load((PROM / "alerts.rules.yaml").read_text())


@pytest.fixture(scope="module")
def crd():
    return yaml.safe_load((PROM / "alerts.yaml").read_text())


def alerts(doc):
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_prometheus_rule_matches_plain_file(plain, crd):
    assert crd["apiVersion"] == "monitoring.coreos.com/v1" and crd["kind"] == "PrometheusRule"
    assert crd["metadata"]["name"]
    assert crd["spec"]["groups"] == plain["groups"]


def test_rules_are_well_formed(plain):
    rules = alerts(plain)
    for name, r in rules.items():
        check(r["expr"], name)
        assert r["labels"]["severity"] in {"warning", "critical"}, name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, name


def test_required_alerts(plain):
    rules = alerts(plain)
    exprs = {n: " ".join(r["expr"].split()) for n, r in rules.items()}
    assert 'metabridge_credentials_issued_total{outcome="error"}' in exprs["MetabridgeCredentialIssuanceFailing"]
    assert "metabridge_cache_soonest_expiry_seconds" in exprs["MetabridgeCredentialExpiringSoon"]
    assert "< 600" in exprs["MetabridgeCredentialExpiringSoon"]  # 10 minutes
    assert exprs["MetabridgeNotReady"] == "metabridge_ready == 0"
    assert "metabridge_iptables_repairs_total" in exprs["MetabridgeIptablesRepairsRepeated"]


def test_promtool_check_and_unit_tests():
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    subprocess.run([promtool, "check", "rules", str(PROM / "alerts.rules.yaml")], check=True, capture_output=True)
    r = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=REPO / "tests" / "chart",
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_can_fail(tmp_path):
    """A rule with the wrong threshold must fail alerts_test.yaml."""
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    (tmp_path / "deploy" / "prometheus").mkdir(parents=True)
    (tmp_path / "tests" / "chart").mkdir(parents=True)
    text = (PROM / "alerts.rules.yaml").read_text()
    assert "< 600" in text
    (tmp_path / "deploy" / "prometheus" / "alerts.rules.yaml").write_text(text.replace("< 600", "< 60"))
    shutil.copy(REPO / "tests" / "chart" / "alerts_test.yaml", tmp_path / "tests" / "chart")
    r = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=tmp_path / "tests" / "chart",
                       capture_output=True, text=True)
    assert r.returncode != 0 and "MetabridgeCredentialExpiringSoon" in r.stdout + r.stderr

"""deploy/grafana/metabridge.json: importable as is, and every query names only
metrics (and labels) docs/CONTRACTS.md defines. (A second test that scrapes a
running metabridge's /metrics lives with the end-to-end tests.)"""

from __future__ import annotations

import json
import re

import pytest

from chartlib import REPO, contract_metrics
from promql import check

DASHBOARD = REPO / "deploy" / "grafana" / "metabridge.json"
# Grafana variables, replaced by what Grafana would send.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


@pytest.fixture(scope="module")
def dash():
    return json.loads(DASHBOARD.read_text())


def panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def queries(dash):
    for p in panels(dash):
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            assert m, f"variable {v['name']}: unexpected query {q}"
            yield f"variable {v['name']}", m.group(1)


def substitute(q: str) -> str:
    for k, v in GRAFANA_VARS.items():
        q = q.replace(k, v)
    return re.sub(r"\$\{?[a-z_]+\}?", ".*", q)  # $job, $instance → regex values


def test_importable(dash):
    (inp,) = dash["__inputs"]
    assert inp["type"] == "datasource" and inp["pluginId"] == "prometheus"
    ds = "${%s}" % inp["name"]
    assert dash["uid"] == "metabridge" and dash["id"] is None and dash["title"]
    assert isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    required_panel_types = {r["id"] for r in dash["__requires"] if r["type"] == "panel"}
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["type"] in required_panel_types, p["title"]
        assert p["datasource"]["uid"] == ds, p["title"]
        assert p["targets"], f"{p['title']}: no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == ds
        assert p.get("description"), f"{p['title']}: no description"
    for v in dash["templating"]["list"]:
        assert v["datasource"]["uid"] == ds


def test_layout_does_not_overlap(dash):
    taken = set()
    for p in panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells


def test_every_query_uses_contract_metrics(dash):
    used = set()
    for where, q in queries(dash):
        used |= check(substitute(q), where)
    families = {re.sub(r"_(bucket|sum|count)$", "", u) if u not in contract_metrics() else u for u in used}
    # What the issue asks the dashboard to show.
    wanted = {
        "metabridge_credentials_issued_total", "metabridge_request_duration_seconds",
        "metabridge_requests_total", "metabridge_upstream_request_duration_seconds",
        "metabridge_cache_hits_total", "metabridge_cache_misses_total", "metabridge_cache_refreshes_total",
        "metabridge_cache_entries", "metabridge_cache_soonest_expiry_seconds", "metabridge_pods_indexed",
        "metabridge_unknown_ip_lookups_total", "metabridge_watch_restarts_total",
        "metabridge_iptables_repairs_total", "metabridge_iptables_rules_installed", "metabridge_ready",
    }
    assert wanted <= families, f"not on the dashboard: {wanted - families}"


def test_histograms_are_read_as_histograms(dash):
    """histogram_quantile over a _bucket rate grouped by le - the only correct form."""
    for where, q in queries(dash):
        for m in re.finditer(r"histogram_quantile\(([0-9.]+),\s*sum by \(([^)]*)\) \(rate\((\w+)\{", q):
            assert 0 < float(m.group(1)) < 1
            assert "le" in [l.strip() for l in m.group(2).split(",")], where
            assert m.group(3).endswith("_bucket"), where
        assert not re.search(r"histogram_quantile\([^)]*_count", q), where


def test_check_rejects_unknown_metrics_and_labels():
    """The checker the tests above rely on does fail."""
    with pytest.raises(AssertionError, match="not in docs/CONTRACTS.md"):
        check("rate(metabridge_tokens_issued_total[5m])", "t")
    with pytest.raises(AssertionError, match="has no label"):
        check('metabridge_cache_entries{cloud="aws"}', "t")
    with pytest.raises(AssertionError, match="groups by"):
        check("sum by (cloud) (metabridge_cache_entries)", "t")
    with pytest.raises(AssertionError, match="does not parse"):
        check("sum(rate(metabridge_ready[5m])", "t")
    with pytest.raises(AssertionError, match="not in docs/CONTRACTS.md"):
        check("metabridge_ready_bucket", "t")  # a gauge has no buckets

"""/metrics of a running metabridge, scraped in the testbed after real traffic
through both APIs: every series the Grafana dashboard and the alert rules query
exists, and the values tell the truth about what happened."""

from __future__ import annotations

import json
from pathlib import Path

import promql_parser as pp
import yaml

from support.clouds import trust_workload

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "metabridge.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.rules.yaml"

FLAVOR = {"Metadata-Flavor": "Google"}


def queried_series() -> set[str]:
    """Metric names selected by the dashboard's panels and variables and by
    every alert rule."""
    exprs = []
    dash = json.loads(DASHBOARD.read_text())
    panels = list(dash["panels"])
    for p in dash["panels"]:
        panels.extend(p.get("panels", []))
    exprs += [t["expr"] for p in panels for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            exprs.append(q[len("label_values("):q.rindex(",")])
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        exprs += [r["expr"] for r in group["rules"]]
    names: set[str] = set()
    for expr in exprs:
        for var, val in {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}.items():
            expr = expr.replace(var, val)
        expr = expr.replace("$job", ".*").replace("$instance", ".*")

        def visit(node):
            if isinstance(node, pp.VectorSelector):
                name = node.name or next(
                    (m.value for m in node.matchers.matchers if m.name == "__name__"), None)
                if name and name != "up":
                    names.add(name)

        pp.walk(pp.parse(expr), visit)
    return names


def test_dashboard_and_alert_series_exist_after_real_traffic(testbed, fake_kube, fake_google, fake_aws):
    w = trust_workload(fake_kube, fake_google, fake_aws, "shop", "app")
    pod = testbed.add_pod("app-1", "shop", "app", w.annotations)
    mb = testbed.start_metabridge(*w.metabridge_args)

    base = "/computeMetadata/v1/instance/service-accounts/default"
    for _ in range(3):
        token = testbed.metadata_get(pod, base + "/token", headers=FLAVOR)
        assert token.status == 200, token.text
    ident = testbed.metadata_get(pod, base + "/identity?audience=https://x.example", headers=FLAVOR)
    assert ident.status == 200, ident.text
    assert testbed.metadata_get(pod, "/computeMetadata/v1/nope", headers=FLAVOR).status == 404
    session = testbed.metadata_get(pod, "/latest/api/token", method="PUT",
                                   headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert session.status == 200, session.text
    creds = testbed.metadata_get(pod, "/latest/meta-data/iam/security-credentials/app",
                                 headers={"X-aws-ec2-metadata-token": session.text})
    assert creds.status == 200 and json.loads(creds.text)["Code"] == "Success", creds.text

    scraped = mb.metrics()
    present = {name for name, _ in scraped}
    missing = sorted(queried_series() - present)
    assert not missing, f"the dashboard/alerts query series /metrics does not expose: {missing}"

    def value(name, **labels):
        return sum(v for (n, ls), v in scraped.items()
                   if n == name and set(labels.items()) <= set(ls))

    assert value("metabridge_ready") == 1
    assert value("metabridge_pods_indexed") == 1
    assert value("metabridge_iptables_rules_installed") == 2  # jump + one DNAT rule
    assert value("metabridge_requests_total", api="gce", route="token", status="200") == 3
    assert value("metabridge_requests_total", api="gce", route="not_found", status="404") == 1
    assert value("metabridge_requests_total", api="imds", route="credentials", status="200") == 1
    # One mint per credential, whatever the number of requests (prefetch + cache).
    assert value("metabridge_credentials_issued_total", cloud="google", kind="access_token", outcome="ok") == 1
    assert value("metabridge_credentials_issued_total", cloud="google", kind="id_token", outcome="ok") == 1
    assert value("metabridge_credentials_issued_total", cloud="aws", kind="aws_session", outcome="ok") == 1
    assert value("metabridge_cache_hits_total", kind="google_access_token") >= 2
    assert value("metabridge_cache_entries") == 3
    assert 0 < value("metabridge_cache_soonest_expiry_seconds") <= 3600
    assert value("metabridge_upstream_request_duration_seconds_count", endpoint="google_sts", outcome="ok") >= 1
    assert value("metabridge_upstream_request_duration_seconds_count",
                 endpoint="aws_assume_role_with_web_identity", outcome="ok") == 1
    # Bounded cardinality: no label value is a pod name or an IP.
    for (_, labels) in scraped:
        for _, v in labels:
            assert pod.ip not in v and "app-1" not in v, labels
    # And the exposition carries no secret.
    assert json.loads(creds.text)["SecretAccessKey"] not in mb.metrics_text()

"""Helpers for the chart / deploy tests (imported by the test modules; the
name is unique so it never collides with tests/conftest.py).

The chart is rendered with real Helm: `helm-python-sdk` binds Helm v4's Go SDK
(libhelm_c) through ctypes, so no helm binary and no cluster are needed.
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "metabridge"
CONTRACTS = REPO / "docs" / "CONTRACTS.md"
RELEASE = "metabridge"
NAMESPACE = "kube-system"

# Minimal values that turn each API on (schema-valid).
GCE = {
    "gce": {
        "enabled": True,
        "workloadIdentityProvider": "projects/123456789012/locations/global/workloadIdentityPools/metabridge/providers/eks-prod",
        "projectId": "my-project",
    }
}
IMDS = {"imds": {"enabled": True, "region": "eu-west-1"}}


def deep_merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = deep_merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
    return out


@lru_cache(maxsize=1)
def _chart():
    import helm_python

    return helm_python.Chart.load(str(CHART))


def render_raw(values: dict | None = None, namespace: str = NAMESPACE) -> dict[str, str]:
    """Render the chart (as `helm install` would) → {template path: text}."""
    return _chart().render(values or {}, name=RELEASE, namespace=namespace, is_install=True)


def render(values: dict | None = None, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Render and parse every Kubernetes object (NOTES.txt excluded)."""
    objs = []
    for path, text in sorted(render_raw(values, namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objs.append(doc)
    return objs


def notes(values: dict | None = None) -> str:
    return render_raw(values)["metabridge/templates/NOTES.txt"]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def kinds(objs: list[dict]) -> list[str]:
    return sorted(o["kind"] for o in objs)


def container(objs: list[dict]) -> dict:
    ds = one(objs, "DaemonSet")
    cs = ds["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1
    return cs[0]


def env(objs: list[dict]) -> dict[str, Any]:
    """Container env as {name: value or valueFrom}."""
    out = {}
    for e in container(objs)["env"]:
        assert e["name"] not in out, f"duplicate env {e['name']}"
        out[e["name"]] = e.get("value", e.get("valueFrom"))
    return out


# --- docs/CONTRACTS.md -------------------------------------------------------


@lru_cache(maxsize=1)
def contract_metrics() -> dict[str, dict[str, Any]]:
    """{metric name: {"type": counter|gauge|histogram, "labels": set}} from the metrics table."""
    text = CONTRACTS.read_text()
    section = text.split("## Prometheus metrics", 1)[1]
    metrics: dict[str, dict[str, Any]] = {}
    for line in section.splitlines():
        if not line.startswith("| `metabridge_"):
            continue
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`(metabridge_[a-z0-9_]+)`", cols[0])
        mtype = cols[1].split()[0]
        # Label names are the backticked words outside "(...)" value lists.
        labels = set(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", cols[2])))
        for n in names:
            metrics[n] = {"type": mtype, "labels": labels}
    assert len(metrics) >= 15, f"could not parse the metrics table of {CONTRACTS}: {metrics}"
    return metrics


@lru_cache(maxsize=1)
def contract_env_vars() -> set[str]:
    """Env vars the binary reads: docs/CONTRACTS.md's CLI table plus the
    configuration reference in README.md (flags added after the contract)."""
    text = CONTRACTS.read_text()
    section = text.split("## Binary CLI", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))
    assert "NODE_NAME" in names and "METABRIDGE_LISTEN" in names, names
    readme = REPO / "README.md"
    if readme.exists():
        names |= set(re.findall(r"\| `--[a-z0-9-]+`[^|]*\| `(METABRIDGE_[A-Z0-9_]+)`", readme.read_text()))
    return names


# Series a metric family exposes, for the PromQL checks.
def series_names() -> dict[str, set[str]]:
    """{series name: allowed label names} incl. histogram _bucket/_sum/_count."""
    out: dict[str, set[str]] = {}
    for name, m in contract_metrics().items():
        if m["type"] == "histogram":
            out[name + "_bucket"] = m["labels"] | {"le"}
            out[name + "_sum"] = set(m["labels"])
            out[name + "_count"] = set(m["labels"])
        else:
            out[name] = set(m["labels"])
    return out


# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint", "node"}

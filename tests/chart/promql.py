"""PromQL checks shared by the dashboard and alert tests: every query parses
(promql-parser, a port of Prometheus' own parser) and names only metrics and
labels docs/CONTRACTS.md defines."""

from __future__ import annotations

import promql_parser as pp

from chartlib import TARGET_LABELS, series_names

# Series Prometheus itself creates for every target.
PROMETHEUS_SERIES = {"up": set()}


def _walk(expr, fn):
    pp.walk(expr, fn)


def selectors(expr) -> list:
    found = []

    def visit(node):
        if isinstance(node, pp.VectorSelector):
            found.append(node)

    _walk(expr, visit)
    return found


def selector_name(sel) -> str | None:
    if sel.name:
        return sel.name
    for m in sel.matchers.matchers:
        if m.name == "__name__":
            return m.value
    return None


def check(query: str, where: str) -> set[str]:
    """Parse `query`; assert its metrics and labels exist. Returns the series used."""
    try:
        expr = pp.parse(query)
    except Exception as e:  # the parser raises ValueError with the position
        raise AssertionError(f"{where}: does not parse: {e}\n{query}") from e
    known = {**series_names(), **PROMETHEUS_SERIES}
    used: set[str] = set()
    sels = selectors(expr)
    assert sels, f"{where}: selects no metric: {query}"
    for sel in sels:
        name = selector_name(sel)
        assert name in known, f"{where}: metric {name!r} is not in docs/CONTRACTS.md: {query}"
        used.add(name)
        for m in sel.matchers.matchers:
            if m.name == "__name__":
                continue
            assert m.name in known[name] | TARGET_LABELS, (
                f"{where}: {name} has no label {m.name!r} (has {sorted(known[name])}): {query}")

    # Grouping labels must exist on some metric below the aggregation.
    def visit(node):
        if isinstance(node, pp.AggregateExpr) and node.modifier is not None:
            inner = {selector_name(s) for s in selectors(node.expr)}
            available = set(TARGET_LABELS)
            for n in inner:
                available |= known.get(n, set())
            for label in node.modifier.labels:
                assert label in available, (
                    f"{where}: groups by {label!r}, which none of {sorted(inner)} has: {query}")

    _walk(expr, visit)
    return used

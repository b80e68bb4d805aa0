"""The committed benchmark results are what the bench itself reports.

benches/results/*.md is the markdown `benches/metadata_bench.py` printed; the
JSON beside it holds the raw runs. Rendering the JSON again with the command
line it records must give the committed markdown (before any warnings the run
appended), so the README's numbers can be traced to raw measurements and the
report code keeps working. The bench itself (root, nginx, wrk, minutes of
load) is not run in CI.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = sorted((REPO / "benches" / "results").glob("*.json"))


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "metadata_bench", REPO / "benches" / "metadata_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["metadata_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_there_are_committed_results():
    assert RESULTS, "benches/results/ holds no run"


@pytest.mark.parametrize("raw", RESULTS, ids=[p.stem for p in RESULTS])
def test_committed_report_is_rendered_from_its_raw_runs(raw):
    bench = load_bench()
    results = json.loads(raw.read_text())
    meta = results.pop("meta")
    argv = shlex.split(meta["command"])
    args = bench.parse_args(argv[argv.index("benches/metadata_bench.py") + 1:])
    rendered = bench.report(results, args, meta)
    committed = raw.with_suffix(".md").read_text()
    assert committed.startswith(rendered), "report differs from its raw runs"


@pytest.mark.parametrize("raw", RESULTS, ids=[p.stem for p in RESULTS])
def test_every_identity_cost_one_exchange(raw):
    up = json.loads(raw.read_text())["upstream"]
    assert up["sts_calls"] == up["identities"] > 0, up
    if "aws_identities" in up:
        assert up["aws_assume_role_calls"] == up["aws_identities"], up


def test_readme_figures_come_from_the_newest_report():
    newest = RESULTS[-1].with_suffix(".md").read_text()
    table = newest.split("### Under load", 1)[1].split("###", 1)[0]
    readme = (REPO / "README.md").read_text().split("## Performance", 1)[1]
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) > 2 and cells[1] == "metabridge":
            rps = cells[2].split(" ")[0]
            assert rps in readme, f"{cells[0]}: {rps} req/s is not the README's figure"

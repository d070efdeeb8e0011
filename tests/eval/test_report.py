"""Reports: results.json round-trips, the Markdown table and error section, the comparison plot, merging runs."""

import json
import sys

import pytest

from pippin.errors import PippinError
from pippin.eval.report import load_result, markdown, merge_results, table, write_report
from pippin.eval.suite import ItemError, SuiteResult


def result(rows=None, suite="ifeval"):
    rows = rows or {
        "pippin:default": {"prompt strict %": 30.5, "n prompts": 540},
        "pippin:q35": {"prompt strict %": 28.25, "n prompts": 539},
    }
    return SuiteResult(
        suite=suite,
        metrics=rows,
        headline=["prompt strict %"],
        settings={"systems": list(rows), "judge": None, "limit": None},
        errors=[
            ItemError(stage="data", item="input_data.jsonl:7", message="malformed row: x"),
            ItemError(stage="generate", item="key 3", system="pippin:q35", message="too long"),
        ],
    )


def test_write_report_writes_json_markdown_and_a_plot(tmp_path):
    paths = write_report(result(), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ifeval.png", "report.md", "results.json"]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data["metrics"]["pippin:q35"]["prompt strict %"] == 28.25
    assert data["error_counts"] == {"data": 1, "generate [pippin:q35]": 1}
    md = paths["markdown"].read_text()
    assert "| metric | `pippin:default` | `pippin:q35` |" in md and "| prompt strict % | 30.50 | 28.25 |" in md
    assert "| n prompts | 540 | 539 |" in md and "![ifeval](ifeval.png)" in md
    assert "- generate `key 3` [pippin:q35]: too long" in md and "never counted as a pass or a fail" in md


def test_without_matplotlib_the_report_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    paths = write_report(result(), tmp_path)
    assert "plot" not in paths and "No plot: matplotlib is not installed" in paths["markdown"].read_text()


def test_table_lists_every_metric_per_system():
    text = table(result())
    lines = text.splitlines()
    assert lines[0] == "ifeval: data 1, generate [pippin:q35] 1"
    assert lines[2].split() == ["prompt", "strict", "%", "30.50", "28.25"] and lines[3].split() == ["n", "prompts", "540", "539"]


def test_results_round_trip_and_merge(tmp_path):
    write_report(result(), tmp_path / "a", plots=False)
    write_report(result({"pippin:q35:recovery": {"prompt strict %": 29.0, "n prompts": 541}}), tmp_path / "b", plots=False)
    merged = merge_results([load_result(tmp_path / "a" / "results.json"), load_result(tmp_path / "b" / "results.json")])
    assert list(merged.metrics) == ["pippin:default", "pippin:q35", "pippin:q35:recovery"]
    assert len(merged.errors) == 4 and merged.errors[0].stage == "data"
    assert "`pippin:q35:recovery`" in markdown(merged)


def test_merge_refuses_mixed_suites_and_bad_files(tmp_path):
    with pytest.raises(PippinError, match="different suites"):
        merge_results([result(), result(suite="safety")])
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(PippinError, match="is not a pippin eval results.json"):
        load_result(tmp_path / "x.json")

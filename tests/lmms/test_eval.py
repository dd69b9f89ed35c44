"""`embedlens eval`: the table, its paired differences, the chart and the report, and its refusals."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embedlens.cli import app
from tests.lmms._support import lmms_env, write_plan  # noqa: F401 - lmms_env is a fixture

# one xdist worker runs the whole module: its module-scoped fixture (the evaluation run) is built once
pytestmark = pytest.mark.xdist_group("test_eval")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "benchmarks.yaml"

TASKS = "embedlens_synqa,embedlens_pope_mc"


@pytest.fixture(scope="module")
def evaluated(lmms_env, tmp_path_factory):
    """The example plan (anchors discovered on its own data first) on two local tasks, into a relative --output."""
    import os

    work = tmp_path_factory.mktemp("eval")
    here = os.getcwd()
    os.chdir(work)
    try:
        res = CliRunner().invoke(app, ["eval", str(EXAMPLE), "--tasks", TASKS, "--conditions", "prune_dead,prune_random",
                                       "--limit", "4", "--output", "out", "--set", "batch_size=3"])
    finally:
        os.chdir(here)
    return res, work / "out"


def test_writes_table_chart_and_report(evaluated):
    res, out = evaluated
    assert res.exit_code == 0, res.output
    rows = pq.read_table(out / "benchmarks.parquet").to_pylist()
    assert {(r["task"], r["condition"]) for r in rows} == {
        (t, c) for t in TASKS.split(",") for c in ("baseline", "prune_dead", "prune_random")}
    assert (out / "benchmarks.csv").is_file() and (out / "benchmark_samples.csv").is_file()
    samples = pq.read_table(out / "benchmark_samples.parquet").to_pylist()
    for r in rows:
        # the value is the mean of the logged per-document scores; the paired difference is recomputed from them
        mine = {s["doc_id"]: s["score"] for s in samples if (s["task"], s["condition"], s["metric"]) == (r["task"], r["condition"], r["metric"])}
        base = {s["doc_id"]: s["score"] for s in samples if (s["task"], s["condition"], s["metric"]) == (r["task"], "baseline", r["metric"])}
        assert len(mine) == len(base) == 4 == r["paired_n"]
        assert r["value"] == pytest.approx(sum(mine.values()) / 4)
        assert r["diff"] == pytest.approx(r["value"] - r["baseline"])
        assert r["paired_diff"] == pytest.approx(sum(mine[k] - base[k] for k in mine) / 4)
    png = out / "figures" / "benchmarks.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert '<h2 id="benchmarks">Benchmarks (lmms-eval)</h2>' in html and "paired diff" in html
    assert html.count("data:image/png;base64,") == 1  # the chart, once (not again under other figures)
    assert "missing:" not in html and ">None<" not in html
    assert (out / ".embedlens-run").is_file()
    import json

    manifest = json.loads((out / "manifest.json").read_text())  # --set batch_size=3: applied, and recorded as applied
    assert manifest["overrides"] == {"batch_size": 3} and manifest["batch_size"] == 3
    assert "embedlens_pope_mc" in res.output and "prune_random" in res.output


def test_refusals_exit_2(lmms_env, tmp_path):
    plan = write_plan(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(plan), "--tasks", "embedlens_synqa", "--conditions", "prune_ded"])
    assert res.exit_code == 2 and "Unknown condition of plan" in res.output and "Did you mean: prune_dead" in res.output
    res = runner.invoke(app, ["eval", str(plan), "--tasks", "embedlens_synqa,embedlens_synqa"])
    assert res.exit_code == 2 and "--tasks: embedlens_synqa given twice" in res.output
    res = runner.invoke(app, ["eval", str(plan), "--tasks", "embedlens_synqa", "--device", "cuda:7"])
    assert res.exit_code == 2 and "model.device: 'cuda:7' is not available here" in res.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["eval", str(plan), "--tasks", "embedlens_synqa", "--output", str(foreign)])
    assert res.exit_code == 2 and "was not created by embedlens" in res.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert "Traceback" not in res.output


def test_without_lmms_eval_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lmms_eval" else real(name, *a))
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "plan.yaml"), "--tasks", "embedlens_synqa"])
    assert res.exit_code == 2
    assert 'pip install --no-deps "lmms-eval==0.7.3"' in res.output and "Traceback" not in res.output


def test_paired_only_for_per_sample_means():
    """POPE logs one per-sample score (correct or not) under all five metrics: precision and F1 are not its mean,
    so they get no paired difference, even where they happen to equal it."""
    from embedlens.lmms.evaluate import table_rows

    docs = range(4)
    base = {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}
    cond = {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0}
    scores = {"baseline": {"p": {"acc": 0.75, "precision": 0.6, "f1": 0.75}}, "c": {"p": {"acc": 0.5, "precision": 0.5, "f1": 0.4}}}
    per = {(c, "p", m): dict(v) for c, v in (("baseline", base), ("c", cond)) for m in ("acc", "precision", "f1")}
    rows = {(r["condition"], r["metric"]): r for r in table_rows(scores, per, ["baseline", "c"])}
    assert rows[("c", "acc")]["paired_diff"] == pytest.approx(sum(cond[d] - base[d] for d in docs) / 4)
    assert rows[("c", "acc")]["paired_n"] == 4
    # f1 equals the baseline's mean score by chance, but not the condition's: no pairing; precision never
    assert rows[("c", "f1")]["paired_n"] == rows[("c", "precision")]["paired_n"] == 0
    # all scores one value (a model that is always wrong): nothing tells accuracy from precision
    zero = {(c, "p", m): {d: 0.0 for d in docs} for c in ("baseline", "c") for m in ("acc", "precision")}
    flat = {c: {"p": {"acc": 0.0, "precision": 0.0}} for c in ("baseline", "c")}
    assert all(r["paired_n"] == 0 for r in table_rows(flat, zero, ["baseline", "c"]))
    # unless lmms-eval says the metric is aggregated by its mean
    assert [r["paired_n"] for r in table_rows(flat, zero, ["baseline", "c"], {"p": {"acc"}}) if r["metric"] == "acc"] == [4, 4]


def test_notes_say_why_a_metric_is_silent():
    """POPE at 0 under every condition, a constant accuracy, and an F1 (aggregated over the set: nothing to pair)."""
    from embedlens.lmms.report import metric_notes

    rows = []
    for c in ("baseline", "prune_dead"):
        rows.append({"task": "pope", "metric": "pope_accuracy", "condition": c, "value": 0.0, "paired_n": 0})
        rows.append({"task": "pope", "metric": "pope_f1_score", "condition": c, "value": 0.5 if c == "baseline" else 0.4, "paired_n": 0})
        rows.append({"task": "qa", "metric": "acc", "condition": c, "value": 0.75, "paired_n": 4})
        rows.append({"task": "qa", "metric": "exact_match", "condition": c, "value": 0.5 if c == "baseline" else 0.25, "paired_n": 4})
    notes = metric_notes(rows)
    assert notes[("pope", "pope_accuracy", "baseline")].startswith("0 under every condition")
    assert "every document scores the same" in notes[("pope", "pope_accuracy", "prune_dead")]
    assert "aggregates this metric over the whole set" in notes[("pope", "pope_f1_score", "prune_dead")]
    assert notes[("qa", "acc", "prune_dead")] == "0.75 under every condition: the conditions change nothing this metric sees"
    assert notes[("qa", "exact_match", "prune_dead")] == "" and notes[("pope", "pope_f1_score", "baseline")] == ""

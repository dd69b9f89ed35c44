"""The example plans run offline; sweeps and several models expand as written; the report and the comparison
render in headless Chromium without console errors (a screenshot is taken)."""

from __future__ import annotations

import csv
import re
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from embedlens.cli import app
from embedlens.compare import compare_runs
from embedlens.errors import InputError
from embedlens.plan import load_plan, prepare, run, run_all
from tests.support.browser import find_chromium, render

# one xdist worker runs the whole module: its module-scoped fixture (the example runs) is built once
pytestmark = pytest.mark.xdist_group("test_examples_report")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    runs = {}
    for name in ("pruning_study", "sublayer_skip", "injection_sweep", "clip_vs_siglip", "planted_sinks"):
        runs[name] = (run_all(load_plan(EXAMPLES / f"{name}.yaml"), out / name), out / name)
    return runs


@pytest.mark.slow
def test_pruning_study_pairs_every_condition_with_its_control(example_runs):
    results, out = example_runs["pruning_study"]
    s = results["model"].summary
    assert s["controls"] == {
        "prune_dead": "prune_dead_random",
        "prune_alive": "prune_alive_random",
        "mean_dead": "mean_dead_random",
        "mean_alive": "mean_alive_random",
    }
    assert set(s["effects"]) == {"prune_dead", "prune_dead_random", "prune_alive", "prune_alive_random", "mean_dead", "mean_dead_random", "mean_alive", "mean_alive_random", "blind"}
    # the control removes as many tokens as its condition (so the comparison is matched)
    e = s["effects"]
    assert e["prune_dead"]["visual_tokens_mean"] == pytest.approx(e["prune_dead_random"]["visual_tokens_mean"])
    assert e["blind"]["visual_tokens_mean"] == 0
    assert e["mean_dead"]["visual_tokens_mean"] == e["mean_dead"]["visual_tokens_mean_base"]  # replaced, not removed
    rows = list(csv.DictReader(open(out / "effects_summary.csv")))
    assert {r["control"] for r in rows if r["condition"] == "prune_dead"} == {"prune_dead_random"}
    assert (out / "figures" / "effects_correct.png").is_file()


@pytest.mark.slow
def test_effects_summary_control_column_has_no_missing_cells(example_runs):
    """`control` names each condition's matched control and is "" where there is none. It used to be a missing cell
    there, which pandas compares unequal to itself: the 70 of 126 (pruning study) and 44 of 44 (injection sweep)
    cells issue 31 saw differ between a cuda and a cpu run were exactly those, and a run compared with itself
    differed in the same cells. The column depends on the plan alone, so it is the same on every device."""
    import pandas as pd
    import pyarrow.parquet as pq

    for name, n_missing in (("pruning_study", 70), ("injection_sweep", 44)):
        results, out = example_runs[name]
        table = pq.read_table(out / "effects_summary.parquet")
        controls = results["model"].summary.get("controls", {})
        conditions = table.column("condition").to_pylist()
        assert table.column("control").null_count == 0
        assert table.column("control").to_pylist() == [controls.get(c, "") for c in conditions]
        assert sum(c not in controls for c in conditions) == n_missing  # the cells that used to be missing
        first, second = pd.read_parquet(out / "effects_summary.parquet"), pd.read_parquet(out / "effects_summary.parquet")
        assert not (first["control"] != second["control"]).any()


@pytest.mark.slow
def test_pruning_report_shows_paired_statistics(example_runs):
    """The pruning study's statistics, recomputed from its effects table with scipy; its token maps from the partition."""
    import pyarrow.parquet as pq
    from scipy import stats as sps

    results, out = example_runs["pruning_study"]
    eff = pq.read_table(out / "effects.parquet").to_pydict()
    tests = pq.read_table(out / "effect_tests.parquet").to_pylist()
    by = {(r["condition"], r["reference"], r["metric"], r["by"], r["group"]): r for r in tests}

    def col(cond, name):
        return [v for c, v in zip(eff["condition"], eff[name]) if c == cond]

    for cond, ref in (("prune_dead", "baseline"), ("prune_dead", "prune_dead_random"), ("prune_alive", "prune_alive_random")):
        x = col(cond, "correct")
        y = col(cond, "correct_base") if ref == "baseline" else col(ref, "correct")
        b = sum(a == 1 and c == 0 for a, c in zip(x, y))
        c_ = sum(a == 0 and c == 1 for a, c in zip(x, y))
        row = by[(cond, ref, "correct", "all", "all")]
        assert (row["x_only"], row["reference_only"]) == (b, c_)
        assert row["p_value"] == pytest.approx(1.0 if b + c_ == 0 else sps.binomtest(b, b + c_, 0.5).pvalue)
        assert row["diff"] == pytest.approx(sum(x) / len(x) - sum(y) / len(y))
        assert row["diff_ci_low"] <= row["diff"] <= row["diff_ci_high"]
    s = results["model"].summary["statistics"]
    assert s["blind"] == "blind" and s["breakdown"] == ["qtype"]
    qtypes = {r["group"] for r in tests if r["by"] == "qtype"}
    assert qtypes and qtypes <= {"colour", "shape", "position", "word", "count"}
    # prune_dead removed exactly the tokens the partition labels dead; its control as many, per sample
    tokens = pq.read_table(out / "tokens.parquet").to_pydict()  # token_partition, the plan's one probe
    dead = {(s_, r, c) for s_, r, c, g in zip(tokens["sample_id"], tokens["row"], tokens["col"], tokens["group"]) if g == "dead"}
    touched = pq.read_table(out / "touched_tokens.parquet").to_pydict()
    removed = {(s_, r, c) for s_, r, c, k in zip(touched["sample_id"], touched["row"], touched["col"], touched["condition"]) if k == "prune_dead"}
    assert removed == dead
    rand = [s_ for s_, k in zip(touched["sample_id"], touched["condition"]) if k == "prune_dead_random"]
    assert sorted(rand) == sorted(s_ for s_, _, _ in dead)
    replaced = {a for a, k in zip(touched["action"], touched["condition"]) if k == "mean_dead"}
    assert replaced == {"replaced"}
    # each control's overlap with its target, against a brute-force count from touched_tokens: none for the dead
    # control (drawn outside the target), the alive one drawn from every token (alive is most of each image)
    acted: dict = {}
    for s_, k, i in zip(touched["sample_id"], touched["condition"], touched["index"]):
        acted.setdefault((k, s_), set()).add(i)
    for cond, ctrl in (("prune_dead", "prune_dead_random"), ("prune_alive", "prune_alive_random")):
        shares = [len(t & acted.get((cond, s_), set())) / len(t) for (k, s_), t in acted.items() if k == ctrl and t]
        row = by[(cond, ctrl, "correct", "all", "all")]
        assert row["overlap"] == pytest.approx(sum(shares) / len(shares))
        assert s["control_overlap"][ctrl] == pytest.approx(row["overlap"])
    assert by[("prune_dead", "prune_dead_random", "correct", "all", "all")]["overlap"] == 0
    assert by[("prune_alive", "prune_alive_random", "correct", "all", "all")]["overlap"] > 0.5
    # at the shipped n = 12 no verdict is stronger than the data support: a row claims evidence only where its
    # Holm-adjusted p is below 0.05 (a log-prob that fell on all 12 samples); no accuracy comparison does, and each
    # says what it could have detected; the report warns that n is small
    overall = [r for r in tests if r["by"] == "all" and r["reference"]]
    assert all(r["verdict"].startswith("evidence of") == (r["p_holm"] < 0.05) for r in overall)
    acc = [r for r in overall if r["metric"] == "correct"]
    assert acc and all(r["p_holm"] >= 0.05 and r["mde"] > 0.5 and "only a change of" in r["verdict"] for r in acc)
    assert any("below 20" in w for w in s["warnings"])
    # no duplicate rows (logprob_delta is logprob minus the baseline), no test where nothing varies
    assert "logprob_delta" not in {r["metric"] for r in tests}
    # the token count a condition sets by construction is described, not tested (a "drop of 10.5 tokens" says nothing)
    vt = [r for r in tests if r["metric"] == "visual_tokens_mean" and r["condition"] == "prune_dead" and r["by"] == "all"]
    assert [(r["reference"], r["test"]) for r in vt] == [("", "")] and vt[0]["verdict"].startswith("what the condition did")
    html = (out / "report.html").read_text()
    for text in ("What the effects support", "minus the matched control", "correct by qtype", "breakdown: [qtype]",
                 "Which tokens each condition and its control acted on", "overlap with target", "What the correct comparisons support",
                 "below 20, bootstrap intervals are approximate"):
        assert text in html, text
    for f in ("effects_correct.png", "effects_paired_correct.png", "effects_by_qtype_correct.png", "removed_prune_dead.png"):
        assert (out / "figures" / f).is_file(), f


@pytest.mark.slow
def test_planted_sinks_example_finds_the_planted_patch(example_runs):
    import pyarrow.parquet as pq

    results, out = example_runs["planted_sinks"]
    s = results["model"].summary
    tokens = pq.read_table(out / "token_partition.tokens.parquet").to_pydict()
    where = list(zip(tokens["sample_id"], tokens["row"], tokens["col"]))
    for rule in ("vit_norm", "massive"):  # both detectors: the planted patch of every image, nothing else
        hits = [w for w, h in zip(where, tokens[rule]) if h]
        assert sorted(hits) == sorted((sid, 0, 0) for sid in set(tokens["sample_id"])), rule
    assert all(g == "sink" for (_, r, c), g in zip(where, tokens["group"]) if (r, c) == (0, 0))
    # anchor discovery calls the planted token's nearest word a sink anchor (its tokens are outliers)
    cands = s["anchor_discovery"]["candidates"]
    assert any(c["verdict"] == "sink" and c["outlier_fraction"] >= 0.5 for c in cands), cands
    # and the run's one partition (token_partition labels with it) found the same sink anchor, decoded
    sinks = [a for a in s["partition"]["anchors"] if a["group"] == "sink"]
    assert [a["id"] for a in sinks] == [c["id"] for c in cands if c["verdict"] == "sink"] and all(a["token"] for a in sinks)
    assert s["partition"]["warnings"] == []


@pytest.mark.slow
def test_injection_sweep_expands_the_condition(example_runs):
    results, out = example_runs["injection_sweep"]
    assert list(results["model"].summary["effects"]) == [f"inject[layer={k}]" for k in range(4)]
    loaded = load_plan(EXAMPLES / "injection_sweep.yaml")
    layers = [c[0].params["layer"] for c in loaded.plan.conditions.values()]
    assert layers == [0, 1, 2, 3]
    # injecting later saves prefill compute monotonically
    saved = [results["model"].summary["effects"][f"inject[layer={k}]"]["flops_saved"] for k in range(4)]
    assert saved == sorted(saved) and saved[0] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_sublayer_skip_runs(example_runs):
    results, _ = example_runs["sublayer_skip"]
    assert set(results["model"].summary["effects"]) == {"skip_attn_0", "skip_mlp_0", "skip_both_0_1", "skip_mlp_late"}


@pytest.mark.slow
def test_clip_vs_siglip_runs_both_and_compares(example_runs):
    results, out = example_runs["clip_vs_siglip"]
    assert set(results) == {"clip", "siglip"}
    for name in ("clip", "siglip"):
        m = json.loads((out / name / "manifest.json").read_text())
        assert m["model"]["name"] == name
    rows = list(csv.DictReader(open(out / "compare" / "compare.csv")))
    assert list(rows[0])[:4] == ["section", "key", "clip", "siglip"]
    by_key = {r["key"]: r for r in rows}
    for g in ("sink", "dead", "alive"):
        r = by_key[f"groups.{g}"]
        want = [results[n].summary["token_partition"]["fractions"][g] for n in ("clip", "siglip")]
        assert [float(r["clip"]), float(r["siglip"])] == pytest.approx(want)
        assert float(r["abs_diff"]) == pytest.approx(abs(want[0] - want[1]))
    # anchors are compared by their decoded words; one tokenizer, so no warning
    assert json.loads(by_key["groups.anchors.dead"]["clip"]) == json.loads(by_key["groups.anchors.dead"]["siglip"]) == ["background (86)"]
    assert "different tokenizers" not in (out / "compare" / "compare.html").read_text()


def test_compare_warns_when_tokenizers_differ(example_runs, tmp_path):
    import shutil

    _, out = example_runs["clip_vs_siglip"]
    for name in ("clip", "siglip"):
        shutil.copytree(out / name, tmp_path / name)
    m = json.loads((tmp_path / "siglip" / "manifest.json").read_text())
    m["tokenizer"]["sha256"] = "0" * 16  # as if the second run had another vocabulary
    (tmp_path / "siglip" / "manifest.json").write_text(json.dumps(m))
    cmp = compare_runs([tmp_path / "clip", tmp_path / "siglip"], tmp_path / "cmp")
    assert len(cmp.warnings) == 1 and "different tokenizers" in cmp.warnings[0]
    assert "different tokenizers" in cmp.html.read_text()
    r = CliRunner().invoke(app, ["compare", str(tmp_path / "clip"), str(tmp_path / "siglip"), "-o", str(tmp_path / "cmp2")])
    assert r.exit_code == 0 and "warning: the runs use different tokenizers" in r.output


def test_probe_sweep_gives_separate_tables_and_figures(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "data: {synthetic: {n: 2}}\nprobes:\n  - {name: embedding_lens, params: {layers: [0]}}\n"
        "sweep:\n  embedding_lens.k: [1, 3]\noutput: {dir: out}\n"
    )
    res = run(prepare(load_plan(plan)), tmp_path / "out")
    assert set(res.tables) == {"embedding_lens[k=1].tokens", "embedding_lens[k=3].tokens"}
    cols1 = next(csv.reader(open(tmp_path / "out" / "embedding_lens[k=1].tokens.csv")))
    cols3 = next(csv.reader(open(tmp_path / "out" / "embedding_lens[k=3].tokens.csv")))
    assert "id_2" not in cols1 and "id_3" in cols3
    assert {f.parent.name for f in res.figures} == {"embedding_lens[k=1]", "embedding_lens[k=3]"}


def test_compare_errors_are_clear(tmp_path):
    r = CliRunner().invoke(app, ["compare", str(tmp_path), str(tmp_path / "nope")])
    assert r.exit_code == 2 and "is not a finished embedlens run" in r.output
    with pytest.raises(InputError, match="at least two"):
        compare_runs([tmp_path], tmp_path / "c")


def _chromium_or_skip():
    if find_chromium() is None:
        if os.environ.get("EMBEDLENS_REQUIRE_CHROMIUM"):
            pytest.fail("EMBEDLENS_REQUIRE_CHROMIUM is set but no Chromium was found")
        pytest.skip("no Chromium (apt-get install chromium)")


@pytest.mark.slow
def test_report_and_comparison_render_in_headless_chromium(example_runs, tmp_path):
    _chromium_or_skip()
    _, out = example_runs["clip_vs_siglip"]
    pages = [out / "clip" / "report.html", out / "compare" / "compare.html", example_runs["pruning_study"][1] / "report.html"]
    for i, page in enumerate(pages):
        shot = tmp_path / f"shot{i}.png"
        problems = render(page, shot, width=1280)
        assert problems == [], f"{page}: {problems}"
        im = Image.open(shot)
        assert im.width == 1280 and im.height > 800
        assert len(set(im.convert("L").resize((64, 64)).getdata())) > 20  # not a blank page
    # the page is self-contained: no file references outside it
    text = pages[0].read_text()
    assert 'src="data:image/png;base64,' in text and "src=\"figures/" not in text


def test_the_browser_check_catches_console_errors(tmp_path):
    _chromium_or_skip()
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img src="missing.png"><script>console.error("boom"); nofn();</script></body></html>')
    problems = render(page, tmp_path / "bad.png")
    assert any("boom" in p for p in problems) and any("nofn" in p for p in problems) and any("missing.png" in p for p in problems)


def test_svg_copies_are_reproducible(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "data: {synthetic: {n: 2}}\nprobes: [{name: embedding_lens, params: {k: 1, layers: [0]}}]\n"
        "output: {dir: out, figure_formats: [png, svg], formats: [parquet]}\n"
    )
    a = run(prepare(load_plan(plan)), tmp_path / "a")
    run(prepare(load_plan(plan)), tmp_path / "b")
    svgs = sorted((tmp_path / "a" / "figures").glob("*.svg"))
    assert [p.with_suffix(".png") for p in svgs] == a.figures
    for p in svgs:
        text = p.read_text()
        assert text.startswith("<?xml") and "<svg" in text
        assert text == (tmp_path / "b" / "figures" / p.name).read_text()
    assert not list((tmp_path / "a").glob("*.csv")) and (tmp_path / "a" / "tokens.parquet").is_file()


def test_validate_checks_every_model(tmp_path):
    r = CliRunner().invoke(app, ["validate", str(EXAMPLES / "clip_vs_siglip.yaml")])
    assert r.exit_code == 0, r.output
    assert "ok (clip: llava model, 8 samples" in r.output and "ok (siglip: llava model, 8 samples" in r.output
    bad = tmp_path / "plan.yaml"
    text = (EXAMPLES / "clip_vs_siglip.yaml").read_text().replace("source: zoo:tiny-llava-siglip", "source: zoo:tiny-llava-siglp")
    bad.write_text(text.replace("synthetic: {n: 8, seed: 3}", "synthetic: {n: 8, seed: 3}").replace("dir: ../runs/clip_vs_siglip", f"dir: {tmp_path}/o"))
    r = CliRunner().invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2 and re.search(r"plan\.yaml:\d+ models\.siglip\.source: Unknown zoo model 'tiny-llava-siglp'", r.output), r.output

"""Effect tests of a run (embedlens.plan.conclusions): planted effects tables checked against scipy and hand
numbers; a small sweep run whose removed tokens are known; report.breakdown validation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from embedlens.cli import app
from embedlens.errors import PlanError
from embedlens.plan import load_plan, prepare
from embedlens.plan.conclusions import analyse
from embedlens.plan.schema import ReportSpec

# one xdist worker runs the whole module: its module-scoped fixture (the sweep runs) is built once
pytestmark = pytest.mark.xdist_group("test_conclusions")

# 10 samples; condition "drop" vs its control "drop_random" vs the baseline, and "blind"
IDS = [f"s{i}" for i in range(10)]
BASE = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
DROP = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
RAND = [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
BLIND = [0, 0, 1, 0, 0, 1, 0, 0, 0, 0]
TYPE = ["a", "a", "a", "b", "b", "b", "b", "c", "c", "c"]


def _effects():
    eff = {"sample": [], "condition": [], "correct": [], "correct_base": [], "kl": []}
    rng = np.random.default_rng(0)
    for cond, vals in (("drop", DROP), ("drop_random", RAND), ("blind", BLIND)):
        eff["sample"] += IDS
        eff["condition"] += [cond] * 10
        eff["correct"] += [float(v) for v in vals]
        eff["correct_base"] += [float(v) for v in BASE]
        eff["kl"] += rng.gamma(2.0, 0.1 if cond == "drop" else 0.5, size=10).tolist()
    return eff


def _touched():
    t = {k: [] for k in ("sample_id", "condition", "action", "index", "image", "tile", "row", "col", "n_visual")}
    for s in IDS:
        for cond, n in (("drop", 3), ("drop_random", 3), ("blind", 9)):
            for i in range(n):
                for k, v in zip(t, (s, cond, "removed", i, 0, 0, i // 3, i % 3, 9)):
                    t[k].append(v)
    return t


@pytest.fixture(scope="module")
def planted():
    eff = _effects()
    c = analyse(eff, _touched(), {"drop": "drop_random"}, ReportSpec(resamples=2000), seed=0,
                groups={"type": dict(zip(IDS, TYPE))})
    return eff, c


def test_paired_accuracy_rows_match_scipy(planted):
    _, c = planted
    vs_base = c.find("drop", "baseline", "correct")
    # drop right / baseline wrong: none; baseline right / drop wrong: samples 7, 8
    assert (vs_base["x_only"], vs_base["reference_only"], vs_base["n"]) == (0, 2, 10)
    assert vs_base["diff"] == pytest.approx(np.mean(np.subtract(DROP, BASE)))
    assert vs_base["p_value"] == pytest.approx(sps.binomtest(0, 2, 0.5).pvalue)
    vs_ctrl = c.find("drop", "drop_random", "correct")
    b = sum(x == 1 and y == 0 for x, y in zip(DROP, RAND))
    cc = sum(x == 0 and y == 1 for x, y in zip(DROP, RAND))
    assert (vs_ctrl["x_only"], vs_ctrl["reference_only"]) == (b, cc) == (4, 1)
    assert vs_ctrl["p_value"] == pytest.approx(sps.binomtest(b, b + cc, 0.5).pvalue)
    assert vs_ctrl["diff_ci_low"] <= vs_ctrl["diff"] <= vs_ctrl["diff_ci_high"]
    base = c.find("baseline", "", "correct")
    assert base["mean"] == pytest.approx(0.9) and base["n"] == 10
    assert c.accuracy == ["correct"] and "kl" in c.metrics


def test_continuous_metric_uses_the_exact_sign_flip_test(planted):
    eff, c = planted
    kl = {cond: np.array(eff["kl"][i * 10:(i + 1) * 10]) for i, cond in enumerate(("drop", "drop_random", "blind"))}
    row = c.find("drop", "drop_random", "kl")
    ref = sps.permutation_test((kl["drop"] - kl["drop_random"],), lambda s, axis: np.mean(s, axis=axis),
                               permutation_type="samples", n_resamples=np.inf).pvalue
    assert row["test"] == "sign_flip_permutation" and row["p_value"] == pytest.approx(ref)
    assert row["diff"] == pytest.approx(np.mean(kl["drop"] - kl["drop_random"]))
    # kl has no baseline column: blind, with no control, gets its mean and interval only
    assert c.find("blind", "", "kl")["mean"] == pytest.approx(kl["blind"].mean())


def test_breakdown_blind_and_headline(planted):
    _, c = planted
    for g, want in (("a", (1.0, 1.0)), ("b", (1.0, 1.0)), ("c", (0.0, 2 / 3))):
        row = c.find("drop", "baseline", "correct", "type", g)
        assert (row["mean"], row["mean_reference"]) == pytest.approx(want)
        assert row["n"] == TYPE.count(g)
    assert c.blind == "blind" and c.touched == {"drop": 3.0, "drop_random": 3.0, "blind": 9.0}
    h = c.headline()
    assert h["conditions"]["drop"]["correct"]["vs_control"]["control"] == "drop_random"
    assert h["baseline"]["correct"]["mean"] == pytest.approx(0.9)
    assert h["method"]["resamples"] == 2000


PLAN = """
model: {source: zoo:tiny-llava-clip}
data: {synthetic: {n: 4, seed: 1, size: 96}}
conditions:
  top_rows:
    - {name: prune, params: {tokens: "visual and row < 1"}}
  blind:
    - {name: prune, params: {tokens: visual}}
sweep:
  top_rows.tokens: ["visual and row < 1", "visual and row < 3"]
metrics: [{name: forced_choice}]
report: {breakdown: [qtype], resamples: 500, token_map_samples: 2}
output: {dir: out, formats: [csv]}
batch_size: 4
"""


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    (d / "plan.yaml").write_text(PLAN)
    r = CliRunner().invoke(app, ["run", str(d / "plan.yaml"), "-o", str(d / "out")])
    return r, d / "out"


def test_sweep_over_tokens_removed_draws_a_curve(sweep_run):
    import csv
    import json

    r, out = sweep_run
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())["statistics"]
    names = ['top_rows[tokens=visual and row < 1]', 'top_rows[tokens=visual and row < 3]']
    assert s["sweeps"] == {"top_rows": names} and s["blind"] == "blind"
    # the 96-px images are 6x6 patches: one row is 6 tokens, three rows 18 (planted by the selection)
    assert [s["conditions"][n]["tokens_touched"] for n in names] == [6.0, 18.0]
    touched = list(csv.DictReader(open(out / "touched_tokens.csv")))
    rows = {(t["sample_id"], int(t["row"])) for t in touched if t["condition"] == names[0]}
    assert {r_ for _, r_ in rows} == {0} and all(t["action"] == "removed" for t in touched)
    assert (out / "figures" / "effects_sweep_top_rows_correct.png").is_file()
    assert (out / "figures" / "effects_by_qtype_correct.png").is_file()
    # the console shows the headline table
    assert "minus baseline" in r.output and "(blind)" in r.output
    html = (out / "report.html").read_text()
    assert "against tokens removed" in html and "top_rows.tokens" in html  # the plan's YAML is embedded


def test_quiet_run_prints_no_summary(sweep_run, tmp_path):
    (tmp_path / "plan.yaml").write_text(PLAN.replace("n: 4", "n: 2").replace("sweep:\n  top_rows.tokens: [\"visual and row < 1\", \"visual and row < 3\"]\n", ""))
    r = CliRunner().invoke(app, ["run", str(tmp_path / "plan.yaml"), "-o", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "minus baseline" not in r.output


def test_breakdown_field_must_exist(tmp_path):
    (tmp_path / "plan.yaml").write_text(PLAN.replace("breakdown: [qtype]", "breakdown: [qtpye]"))
    with pytest.raises(PlanError, match=r"plan\.yaml:\d+ report\.breakdown\[0\]: no sample has a field 'qtpye'; .*qtype"):
        prepare(load_plan(tmp_path / "plan.yaml"))
    (tmp_path / "p2.yaml").write_text(PLAN.replace("breakdown: [qtype]", "breakdown: [candidates]"))
    with pytest.raises(PlanError, match="field 'candidates' holds lists"):
        prepare(load_plan(tmp_path / "p2.yaml"))
    (tmp_path / "p3.yaml").write_text(PLAN.replace("resamples: 500", "resamples: 5"))
    with pytest.raises(PlanError, match=r"report\.resamples"):
        load_plan(tmp_path / "p3.yaml")


def test_overlap_holm_verdicts_and_no_duplicate_or_constant_tests():
    """A planted run: the control's tokens drawn at random (some in the target), a token count the same under every
    run, and a log-prob with its delta column; the overlap checked against a brute-force count per sample."""
    rng = np.random.default_rng(5)
    eff = {"sample": [], "condition": [], "correct": [], "correct_base": [], "logprob": [], "logprob_base": [],
           "logprob_delta": [], "visual_tokens": [], "visual_tokens_base": []}
    lp_base = rng.normal(-2.0, 0.5, size=10)
    for cond, vals, shift in (("drop", DROP, -0.4), ("drop_random", RAND, -0.1)):
        lp = lp_base + shift + rng.normal(0, 0.2, size=10)
        eff["sample"] += IDS
        eff["condition"] += [cond] * 10
        eff["correct"] += [float(v) for v in vals]
        eff["correct_base"] += [float(v) for v in BASE]
        eff["logprob"] += lp.tolist()
        eff["logprob_base"] += lp_base.tolist()
        eff["logprob_delta"] += (lp - lp_base).tolist()
        eff["visual_tokens"] += [6.0] * 10
        eff["visual_tokens_base"] += [9.0] * 10
    t = {k: [] for k in ("sample_id", "condition", "action", "index", "image", "tile", "row", "col", "n_visual")}
    chosen = {}
    for s in IDS:
        chosen[("drop", s)] = set(rng.choice(9, size=3, replace=False).tolist())
        chosen[("drop_random", s)] = set(rng.choice(9, size=3, replace=False).tolist())
        for cond in ("drop", "drop_random"):
            for i in sorted(chosen[(cond, s)]):
                for k, v in zip(t, (s, cond, "removed", i, 0, 0, i // 3, i % 3, 9)):
                    t[k].append(v)
    c = analyse(eff, t, {"drop": "drop_random"}, ReportSpec(resamples=2000), seed=0)
    brute = np.mean([len(chosen[("drop", s)] & chosen[("drop_random", s)]) / 3 for s in IDS])
    assert 0 < brute < 1 and c.overlap == {"drop_random": pytest.approx(brute)}
    assert c.find("drop", "drop_random", "correct")["overlap"] == pytest.approx(brute)
    assert c.headline()["conditions"]["drop"]["correct"]["vs_control"]["overlap"] == pytest.approx(brute)
    # logprob_delta repeats logprob minus the baseline: not a row of its own
    assert "logprob_delta" not in c.metrics and "logprob" in c.metrics
    # the token count differs by 3 on every sample: no test, said in words
    vt = c.find("drop", "baseline", "visual_tokens")
    assert vt["test"] == "deterministic" and np.isnan(vt["p_value"]) and vt["verdict"].startswith("deterministic")
    # Holm over the overall rows with a p-value, by hand
    rows = [i for i in range(len(c.rows["by"])) if c.rows["by"][i] == "all" and np.isfinite(c.rows["p_value"][i])]
    ps = sorted((c.rows["p_value"][i], i) for i in rows)
    m, run = len(ps), 0.0
    for j, (p, i) in enumerate(ps):
        run = max(run, min(1.0, (m - j) * p))
        assert c.rows["p_holm"][i] == pytest.approx(run)
    # a plain sentence per comparison; n = 10 is small: a warning, and the MDE of McNemar at n = 10
    base = c.find("drop", "baseline", "correct")
    assert base["verdict"].startswith("no evidence of an effect") and "drop of up to" in base["verdict"]
    # declared descriptive (Metric.descriptive: a count the condition sets), the same column gets a mean and no test
    d = analyse(eff, t, {"drop": "drop_random"}, ReportSpec(resamples=200), seed=0, descriptive={"visual_tokens"})
    vt_rows = [i for i in range(len(d.rows["metric"])) if d.rows["metric"][i] == "visual_tokens" and d.rows["condition"][i] == "drop"]
    assert [(d.rows["reference"][i], d.rows["test"][i], d.rows["mean"][i]) for i in vt_rows] == [("", "", 6.0)]
    assert d.rows["verdict"][vt_rows[0]].startswith("what the condition did")
    assert base["mde"] == pytest.approx(min(1.0, (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) ** 2 / 10))
    assert any("below 20" in w for w in c.warnings) and any("report.min_effect" in w for w in c.warnings)
    # accuracy means: Wilson intervals (0.9 of 10 is not capped at 1 by a bootstrap)
    b = c.find("baseline", "", "correct")
    want = sps.binomtest(9, 10).proportion_ci(method="wilson")
    assert (b["mean_ci_low"], b["mean_ci_high"]) == pytest.approx((want.low, want.high))


def test_four_samples_warn_that_no_change_can_be_detected():
    """At n = 4 McNemar's smallest p is 2 / 2^4 = 0.125 (scipy): the min_effect warning says no change is detectable and
    the verdict says so; was: no warning at all (an infinite mde was filtered out) and 'only a change of 1 ...'."""
    assert sps.binomtest(4, 4, 0.5).pvalue > 0.05
    eff = {"sample": IDS[:4], "condition": ["drop"] * 4, "correct": [0.0, 0.0, 1.0, 0.0], "correct_base": [1.0] * 4}
    c = analyse(eff, None, {}, ReportSpec(resamples=200), seed=0)
    row = c.find("drop", "baseline", "correct")
    assert row["mde"] == float("inf") and "no change can be detected" in row["verdict"]
    assert any("correct: at n = 4 no change is detectable" in w and "report.min_effect" in w for w in c.warnings)


def test_a_count_that_one_condition_drives_to_zero_or_one_is_not_an_accuracy():
    """A metric that reads 0/1 under every condition but counts at the baseline (visual tokens left by a condition
    that removes them all) is not an accuracy: its baseline column must not be taken as successes of n trials."""
    eff = {"sample": IDS, "condition": ["blind"] * 10, "tokens": [0.0] * 9 + [1.0],
           "tokens_base": [float(30 + i) for i in range(10)]}
    c = analyse(eff, None, {}, ReportSpec(resamples=200), seed=0)
    assert "tokens" not in c.accuracy
    base = [i for i, (cond, m) in enumerate(zip(c.rows["condition"], c.rows["metric"])) if cond == "baseline" and m == "tokens"]
    assert base and c.rows["mean"][base[0]] == pytest.approx(np.mean([30 + i for i in range(10)]))


def test_the_verdict_decides_at_the_level_of_its_own_interval():
    """Six samples all dropping: McNemar p = 2 / 2^6 (scipy) lies between 0.01 and 0.05. At report.confidence 0.95 it is
    evidence; at 0.99 the verdict, its 99% interval and the power clause all use level 0.01: not evidence, and no change
    is detectable below 8 samples (2 / 2^8 < 0.01 <= 2 / 2^7). Was: 'evidence ... (99% interval ...)' at a fixed 0.05."""
    p = sps.binomtest(6, 6, 0.5).pvalue
    assert 0.01 < p < 0.05 and sps.binomtest(8, 8, 0.5).pvalue < 0.01 <= sps.binomtest(7, 7, 0.5).pvalue
    eff = {"sample": IDS[:6], "condition": ["drop"] * 6, "correct": [0.0] * 6, "correct_base": [1.0] * 6}
    at95 = analyse(eff, None, {}, ReportSpec(resamples=200, confidence=0.95), seed=0).find("drop", "baseline", "correct")
    at99 = analyse(eff, None, {}, ReportSpec(resamples=200, confidence=0.99), seed=0).find("drop", "baseline", "correct")
    assert at95["p_value"] == pytest.approx(p) and at99["p_value"] == pytest.approx(p)
    assert at95["verdict"].startswith("evidence of a drop of 1") and "95% interval" in at95["verdict"]
    assert at99["verdict"].startswith("no evidence of an effect") and "99% interval" not in at99["verdict"]
    assert at99["mde"] == float("inf") and "cannot reach p < 0.01 with fewer than 8 samples" in at99["verdict"]

"""The token-reduction budget sweep: ``sweep: {"*.keep": [...]}`` expands every method at every budget, each
cell is paired with the random draw at the same budget, and the run writes the leaderboard table, figure and
report section (checked against the run's own effects table, recomputed here)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from embedlens.errors import PlanError
from embedlens.plan import load_plan
from embedlens.plan.preparation import plan_hash
from embedlens.reduction.budget import Budget
from embedlens.stats import mcnemar_exact

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


PLAN = """
model: {{source: zoo:tiny-llava-clip}}
data: {{synthetic: {{n: 6, seed: 4, size: 96}}, padding_side: left}}
conditions:
  fastv: [{{name: fastv, params: {{layer: 2, keep: 0.5}}}}]
  random: [{{name: random_budget, params: {{keep: 0.5}}}}]
  top_row: [{{name: prune, params: {{tokens: "visual and row < 1"}}}}]
sweep:
  "*.keep": {budgets}
metrics: [{{name: forced_choice}}, {{name: answer_logprob}}, {{name: visual_tokens}}, {{name: prefill_flops}}, {{name: prefill_time}}]
report: {{resamples: 200}}
output: {{dir: out, formats: [csv]}}
batch_size: 3
"""


def _write(tmp: Path, budgets: str) -> Path:
    p = tmp / "plan.yaml"
    p.write_text(PLAN.format(budgets=budgets))
    return p


def test_star_sweep_expands_every_method_with_a_budget(tmp_path):
    loaded = load_plan(_write(tmp_path, "[0.333, 0.111]"))
    assert list(loaded.plan.conditions) == ["fastv[keep=0.333]", "fastv[keep=0.111]", "random[keep=0.333]", "random[keep=0.111]", "top_row"]
    assert [c[0].params["keep"] for n, c in loaded.plan.conditions.items() if n != "top_row"] == [0.333, 0.111, 0.333, 0.111]
    assert loaded.plan.conditions["fastv[keep=0.111]"][0].params["layer"] == 2  # the other parameters are copied
    # the expanded conditions are the plan's identity: other budgets, another hash (a resume would refuse)
    other = load_plan(_write(tmp_path, "[0.333, 0.222]"))
    assert plan_hash(loaded) != plan_hash(other)


def test_star_sweep_of_a_parameter_no_condition_takes_is_an_error(tmp_path):
    p = _write(tmp_path, "[0.5]").read_text().replace('"*.keep"', '"*.kep"')
    (tmp_path / "bad.yaml").write_text(p)
    with pytest.raises(PlanError, match=r"bad.yaml:\d+ sweep\.\*\.kep: no condition has an intervention with parameter 'kep'"):
        load_plan(tmp_path / "bad.yaml")


def test_star_sweep_refuses_a_condition_with_two_budgets(tmp_path):
    text = _write(tmp_path, "[0.5]").read_text().replace(
        "  top_row:", "  both: [{name: fastv, params: {keep: 0.5}}, {name: random_budget, params: {keep: 0.5}}]\n  top_row:")
    (tmp_path / "two.yaml").write_text(text)
    with pytest.raises(PlanError, match=r"condition 'both' has several interventions with parameter 'keep'; sweep it with both.INTERVENTION.keep"):
        load_plan(tmp_path / "two.yaml")


def test_example_budgets_are_llava_fractions():
    """The example's fractions keep exactly LLaVA-1.5's 192 / 128 / 64 of 576, and 12 / 8 / 4 of the zoo's 36."""
    loaded = load_plan(EXAMPLES / "token_reduction.yaml")
    budgets = loaded.plan.sweep["*.keep"]
    counts = [int(Budget(b).counts(torch.tensor([576, 36])).tolist()[0]) for b in budgets]
    assert counts == [192, 128, 64]
    assert [int(Budget(b).counts(torch.tensor(36)).item()) for b in budgets] == [12, 8, 4]
    methods = {n.split("[")[0] for n in loaded.plan.conditions}
    assert {"random", "fastv", "visionzip", "partition"} <= methods
    for name in loaded.plan.conditions:  # every method at every budget
        assert any(name == f"{m}[keep={b}]" for m in methods for b in budgets), name
    # and each is compared with random_budget at its own budget
    from embedlens.interventions.condition import Condition
    from embedlens.plan.effects import matched_controls

    conds = [Condition.build(n, [iv.model_dump() for iv in ivs]) for n, ivs in loaded.plan.conditions.items()]
    assert matched_controls(conds) == {f"{m}[keep={b}]": f"random[keep={b}]" for m in methods - {"random"} for b in budgets}


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    from typer.testing import CliRunner

    from embedlens.cli import app

    d = tmp_path_factory.mktemp("reduction")
    plan = _write(d, "[0.333, 0.111]")
    r = CliRunner().invoke(app, ["run", str(plan), "-o", str(d / "out"), "-q"])
    assert r.exit_code == 0, r.output
    return d / "out"


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def test_each_cell_is_paired_with_random_at_its_budget(sweep_run):
    s = json.loads((sweep_run / "summary.json").read_text())
    assert s["controls"] == {"fastv[keep=0.333]": "random[keep=0.333]", "fastv[keep=0.111]": "random[keep=0.111]"}
    board = _rows(sweep_run / "leaderboard.csv")
    assert [(r["method"], r["keep"], r["tokens"]) for r in board] == [
        ("fastv", "0.333", "12"), ("fastv", "0.111", "4"), ("random", "0.333", "12"), ("random", "0.111", "4")]
    effects = _rows(sweep_run / "effects.csv")

    def col(cond: str, name: str) -> dict[str, float]:
        return {e["sample"]: float(e[name]) for e in effects if e["condition"] == cond}

    for r in board:
        cond = r["condition"]
        acc, base = col(cond, "correct"), col(cond, "correct_base")
        assert float(r["accuracy"]) == pytest.approx(sum(acc.values()) / len(acc))
        assert float(r["retention"]) == pytest.approx(100 * sum(acc.values()) / sum(base.values()))
        lp, lp_base = col(cond, "logprob"), col(cond, "logprob_base")
        assert float(r["logprob"]) == pytest.approx(sum(lp.values()) / len(lp))
        assert float(r["logprob_diff"]) == pytest.approx(sum(lp[k] - lp_base[k] for k in lp) / len(lp))
        # McNemar on the discordant pairs, counted here from the effects table
        b = sum(acc[k] == 1 and base[k] == 0 for k in acc)
        c = sum(acc[k] == 0 and base[k] == 1 for k in acc)
        assert float(r["p_baseline"]) == pytest.approx(mcnemar_exact(b, c))
        if r["method"] == "fastv":
            ctrl = col(r["random"], "correct")
            b = sum(acc[k] == 1 and ctrl[k] == 0 for k in acc)
            c = sum(acc[k] == 0 and ctrl[k] == 1 for k in acc)
            assert float(r["p_random"]) == pytest.approx(mcnemar_exact(b, c))
            assert float(r["accuracy_random"]) == pytest.approx(sum(ctrl.values()) / len(ctrl))
        else:
            assert r["random"] == "" and math.isnan(float(r["p_random"]))
        # accounting: random keeps its tokens in every layer; FastV holds all 36 in layers 0-1 of the 4, then the
        # budget (FastV's own equivalent-token count)
        k = int(r["tokens"])
        want = k if r["method"] == "random" else (2 * 36 + 2 * k) / 4
        assert float(r["equivalent_tokens"]) == pytest.approx(want)
        if r["method"] == "fastv":  # its own accounting(): the same mean over layers, with its rule
            assert float(r["paper_tokens"]) == pytest.approx(want) and r["accounting"].startswith("FastV: all 36 tokens")
        else:  # random_budget states no accounting: the measured count, said so
            assert float(r["paper_tokens"]) == k and "measured" in r["accounting"]
        assert float(r["gflops"]) < float(r["gflops_base"])
        assert float(r["prefill_ms"]) > 0 and float(r["select_ms"]) >= 0
        assert math.isnan(float(r["peak_mem_mb"] or "nan"))  # no allocator counter on the CPU


def test_the_report_shows_the_leaderboard_and_the_figure(sweep_run):
    html = (sweep_run / "report.html").read_text()
    assert 'id="leaderboard"' in html and "p vs random" in html and "fastv" in html
    m = json.loads((sweep_run / "manifest.json").read_text())
    assert "figures/leaderboard_accuracy.png" in m["figures"] and "leaderboard" in m["tables"]
    from PIL import Image

    w, h = Image.open(sweep_run / "figures" / "leaderboard_accuracy.png").size
    assert w >= 600 and h >= 400


def test_eval_scores_the_swept_conditions_on_an_lmms_task(tmp_path):
    """`embedlens eval` takes the sweep's conditions by their expanded names (the example's own plan)."""
    from embedlens.lmms.evaluate import run_eval

    res = run_eval(EXAMPLES / "token_reduction.yaml", ["embedlens_synqa"], ["fastv[keep=0.111]"], limit=2, out_dir=tmp_path / "eval",
                   overrides=["data.synthetic.n=8"])  # the partition is discovered on the plan's data first: fewer images
    assert {r["condition"] for r in res.rows} == {"baseline", "fastv[keep=0.111]"}
    assert all(r["paired_n"] == 2 for r in res.rows if r["metric"] == "exact_match")


def test_a_lone_budget_condition_is_no_leaderboard():
    """A plan with one unswept `fastv` (examples/interventions.yaml) is no budget study: no leaderboard. Swept, or
    beside a random control at a budget, it is one."""
    from embedlens.interventions.condition import Condition
    from embedlens.plan.conclusions import Conclusions
    from embedlens.plan.leaderboard import leaderboard

    fastv = Condition.build("fastv", [{"name": "fastv", "params": {"layer": 2, "keep": 0.5}}])
    random = Condition.build("random", [{"name": "random_budget", "params": {"keep": 0.5}}])
    concl = Conclusions()
    assert leaderboard(concl, {}, [fastv], {}) is None
    assert leaderboard(concl, {}, [fastv], {"fastv": ["fastv"]})["method"] == ["fastv"]
    assert leaderboard(concl, {}, [fastv, random], {})["method"] == ["fastv", "random"]

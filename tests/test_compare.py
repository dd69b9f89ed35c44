"""`compare_runs` on two planted run folders: lists compared as sets, per-layer values drawn as curves on shared axes."""

from __future__ import annotations

import csv
import json

from embedlens.compare import compare_runs
from embedlens.files import claim


def _run(path, anchors, per_layer, kl_layers):
    claim(path, kind="run")
    (path / "manifest.json").write_text(json.dumps({"model": {"name": path.name}, "figures": [], "plan_hash": "x"}))
    summary = {
        "partition": {"anchors": [{"group": "dead", "id": i, "token": t} for i, t in anchors]},
        "logit_lens": {"per_layer_rank": per_layer},
        "effects": {"prune": {f"visual_tokens_l{i}": v for i, v in enumerate(kl_layers)}},
        "data": {"used": 4},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_lists_as_sets_and_per_layer_curves(tmp_path):
    a = _run(tmp_path / "clip", [(1, "sky"), (2, "red"), (3, "dog")], [9.0, 5.0, 2.0, 1.0], [36, 36, 20])
    b = _run(tmp_path / "siglip", [(2, "red"), (1, "sky"), (4, "cat")], [9.0, 7.0, 6.0, 1.0], [36, 30, 10])
    cmp = compare_runs([a, b], tmp_path / "cmp")
    rows = {r["key"]: r for r in cmp.rows}
    anchors = rows["groups.anchors.dead"]
    # same words in another order are not a difference; 2 shared of 4 distinct: 1 - 2/4
    assert anchors["rel_diff"] == 0.5
    assert anchors["detail"] == "shared (2): red (2), sky (1); only clip (1): dog (3); only siglip (1): cat (4)"
    # per-layer values: the list, and the _lN columns gathered into one curve, each a figure with both runs
    names = sorted(p.name for p in cmp.curves)
    assert names == ["effects.prune.visual_tokens_l_.png", "logit_lens.per_layer_rank.png"]
    assert all(p.is_file() and p.parent == tmp_path / "cmp" / "curves" for p in cmp.curves)
    assert "Per-layer values: every run on shared axes" in cmp.html.read_text()
    out = list(csv.DictReader(open(cmp.csv)))
    assert out[0].keys() >= {"detail"} and next(r for r in out if r["key"] == "groups.anchors.dead")["detail"].startswith("shared (2)")
    # reordered but equal lists: no difference at all
    c = _run(tmp_path / "clip2", [(3, "dog"), (1, "sky"), (2, "red")], [9.0, 5.0, 2.0, 1.0], [36, 36, 20])
    cmp2 = compare_runs([a, c], tmp_path / "cmp2")
    assert {r["key"]: r for r in cmp2.rows}["groups.anchors.dead"]["rel_diff"] == 0.0


def _effects_run(path, correct, logprob, ids):
    """A run folder with a per-sample effects table: condition 'drop' and its control 'drop_random'."""
    claim(path, kind="run")
    rows = []
    for cond, shift in (("drop", 0), ("drop_random", 1)):
        for s, c, lp in zip(ids, correct[shift], logprob[shift]):
            rows.append({"sample": s, "condition": cond, "correct": c, "correct_base": 1.0, "logprob": lp, "logprob_base": -1.0})
    with open(path / "effects.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (path / "manifest.json").write_text(json.dumps({"model": {"name": path.name}, "figures": [], "plan_hash": "x",
                                                    "tables": {"effects": "effects.csv"}}))
    summary = {"effects": {"drop": {"logprob": 0.001, "correct": 0.5}, "drop_random": {"logprob": 0.5, "correct": 0.9}},
               "effects_sem": {"drop": {"logprob": 0.1, "correct": 0.1}, "drop_random": {"logprob": 0.1, "correct": 0.1}},
               "controls": {"drop": "drop_random"}, "data": {"used": len(ids)}}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_models_are_tested_paired_over_shared_samples(tmp_path):
    import numpy as np
    import pytest
    from scipy import stats as sps

    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(12)]
    lp_a = [rng.normal(-2, 0.5, 12), rng.normal(-1.2, 0.5, 12)]
    lp_b = [rng.normal(-1, 0.5, 11), rng.normal(-1.1, 0.5, 11)]
    a = _effects_run(tmp_path / "clip", [[1.0] * 12, [1.0] * 12], lp_a, ids)
    b = _effects_run(tmp_path / "siglip", [[1.0] * 11, [1.0] * 11], lp_b, ids[1:])  # s0 missing: 11 shared samples
    sb = json.loads((b / "summary.json").read_text())
    sb["effects"]["drop"]["logprob"] = -0.007  # vs 0.001: a large relative difference between two near-zero values
    sb["effects"]["drop_random"]["logprob"] = 0.9  # vs 0.5 with standard errors 0.1: z = 0.4 / sqrt(0.02)
    (b / "summary.json").write_text(json.dumps(sb))
    cmp = compare_runs([a, b], tmp_path / "cmp")
    row = next(r for r in cmp.model_tests if (r["condition"], r["reference"], r["metric"]) == ("drop", "baseline", "logprob"))
    d = (lp_a[0][1:] + 1.0) - (lp_b[0] + 1.0)  # each model's effect on the shared samples, then their difference
    assert row["n_shared"] == 11 and row["diff"] == pytest.approx(d.mean())
    want = sps.permutation_test((d,), lambda s, axis: np.mean(s, axis=axis), permutation_type="samples", n_resamples=np.inf).pvalue
    assert row["p_value"] == pytest.approx(want) and row["diff_ci_low"] <= row["diff"] <= row["diff_ci_high"]
    assert row["standardised"] == pytest.approx(d.mean() / d.std(ddof=1))
    # an effect that is 0 in both models on every sample gets no test
    same = next(r for r in cmp.model_tests if (r["condition"], r["reference"], r["metric"]) == ("drop", "baseline", "correct"))
    assert same["test"] == "deterministic" and same["verdict"].startswith("deterministic")
    # ordered by the absolute standardised difference; Holm across the table
    z = [abs(r["standardised"]) for r in cmp.model_tests]
    assert z == sorted(z, reverse=True)
    html = cmp.html.read_text()
    assert "Do the models differ?" in html and (tmp_path / "cmp" / "compare_effects.csv").is_file()
    # near-zero values (0.001 in both runs) are not listed as differences; effects read as a table, not flattened keys
    diffs = {r["key"]: r for r in cmp.differences()}
    assert "effects.drop.logprob" not in diffs
    assert diffs["effects.drop_random.logprob"]["z"] == pytest.approx(0.4 / np.sqrt(0.02))
    assert "<h2>Intervention effects</h2>" in html and "effects.drop.logprob</td>" not in html.split("<h2>Intervention effects</h2>")[1].split("<h2>")[0]


def test_the_model_difference_verdict_decides_at_the_level_of_its_interval():
    """A Holm p of 0.03 is a difference at 95% and not at 99%: the sentence's level matches its interval. Was: a fixed
    0.05, so at 0.99 it said 'the effect is larger ... (99% interval ...)'."""
    from embedlens.compare_effects import _verdict

    row = {"n_shared": 20, "diff": 0.4, "diff_ci_low": -0.02, "diff_ci_high": 0.8, "test": "sign_flip_permutation",
           "p_value": 0.03, "p_holm": 0.03, "mde": 0.5}
    assert _verdict(row, "clip", 0.95).startswith("the effect is larger in clip by 0.4 (95% interval")
    said = _verdict(row, "clip", 0.99)
    assert said.startswith("no evidence that the models differ") and "99% interval" not in said

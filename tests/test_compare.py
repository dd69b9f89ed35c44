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


def _map_run(path, groups, entropy, words):
    """A run folder with one per-token table: 2 samples on a 3x3 grid; `words` per layer (0 and 2)."""
    claim(path, kind="run")
    rows = []
    for s in range(2):
        for i in range(9):
            for layer in (0, 2):
                rows.append({"sample": s, "sample_id": f"s{s}", "image": 0, "tile": 0, "row": i // 3, "col": i % 3, "layer": layer,
                             "group": groups[s][i], "normalized_entropy": entropy[s][i], "token_1": words[layer][s][i]})
    with open(path / "tokens.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (path / "manifest.json").write_text(json.dumps({"model": {"name": path.name}, "figures": [], "plan_hash": "x",
                                                    "tables": {"tokens": "tokens.csv"}}))
    (path / "summary.json").write_text(json.dumps({"data": {"used": 2}}))
    return path


def test_side_by_side_maps_share_one_colour_scale(tmp_path, monkeypatch):
    """Every panel of a compare map (a row per run) is drawn under one norm and colour map: a heat map spans the
    smallest to the largest value of both runs, and a word or group has the same colour in every run's panels."""
    import collections

    import numpy as np
    import pytest
    from matplotlib.image import AxesImage

    from embedlens import figures
    from embedlens.figures import GROUP_COLOURS, OTHER_COLOUR, WORD_COLOURS
    from matplotlib.colors import to_rgba

    rng = np.random.default_rng(1)
    vocab = ["sky", "red", "background", "cat", "dog", "a", "b", "c", "d", "e", "f", "g", "h", "i"]  # 14 > 12 coloured
    runs = {}
    for name, lo, hi in (("clip", 0.0, 0.3), ("siglip", 0.4, 0.9)):  # scales that would differ if each had its own
        groups = [[str(rng.choice(["dead", "alive", "sink"])) for _ in range(9)] for _ in range(2)]
        entropy = [list(rng.uniform(lo, hi, 9)) for _ in range(2)]
        words = {layer: [[str(rng.choice(vocab)) for _ in range(9)] for _ in range(2)] for layer in (0, 2)}
        runs[name] = (_map_run(tmp_path / name, groups, entropy, words), groups, entropy, words)
    got = {}
    save = figures._save

    def capture(fig, path, tight=True):
        got[path.name] = fig
        return save(fig, path, tight)

    monkeypatch.setattr(figures, "_save", capture)
    cmp = compare_runs([runs["clip"][0], runs["siglip"][0]], tmp_path / "cmp")
    assert sorted(p.name for p in cmp.maps) == ["tokens_group.png", "tokens_normalized_entropy_l0.png", "tokens_token_1_l0.png",
                                                "tokens_token_1_l2.png"]
    assert all(p.is_file() for p in cmp.maps) and "Token maps on one colour scale" in cmp.html.read_text()

    def images(name):
        fig = got[name]
        ims = [im for ax in fig.axes for im in ax.get_images() if isinstance(im, AxesImage)]
        assert len(ims) == 4  # 2 runs x 2 samples
        assert len({(im.norm.vmin, im.norm.vmax) for im in ims}) == 1 and all(im.cmap == ims[0].cmap for im in ims)
        return ims

    ims = images("tokens_normalized_entropy_l0.png")
    every = [v for _, _, e, _ in runs.values() for s in e for v in s]
    assert (ims[0].norm.vmin, ims[0].norm.vmax) == pytest.approx((min(every), max(every)))

    def colour_of(im, r, c):
        return tuple(np.round(im.cmap(im.norm(im.get_array()[r, c])), 3))

    # panels run by run, sample by sample: clip s0, clip s1, siglip s0, siglip s1
    for fname, truth in (("tokens_group.png", lambda run, s: runs[run][1][s]),
                         ("tokens_token_1_l2.png", lambda run, s: runs[run][3][2][s])):
        ims = images(fname)
        seen: dict[str, set] = collections.defaultdict(set)
        for k, (run, s) in enumerate([("clip", 0), ("clip", 1), ("siglip", 0), ("siglip", 1)]):
            for i, label in enumerate(truth(run, s)):
                seen[label].add(colour_of(ims[k], i // 3, i % 3))
        assert all(len(c) == 1 for c in seen.values()), seen  # one colour per category in every run's panels
        if fname == "tokens_group.png":
            assert {g: c.pop() for g, c in seen.items()} == {g: tuple(np.round(to_rgba(GROUP_COLOURS[g]), 3)) for g in seen}
        else:  # words by their count over both runs: the 12 most frequent coloured in that order, the rest grey
            counts = collections.Counter(w for run in runs.values() for s in run[3][2] for w in s)
            top = [w for w, _ in counts.most_common(12)]
            want = {w: to_rgba(WORD_COLOURS[top.index(w)] if w in top else OTHER_COLOUR) for w in seen}
            assert {w: c.pop() for w, c in seen.items()} == {w: tuple(np.round(v, 3)) for w, v in want.items()}


def test_a_table_that_cannot_be_read_leaves_its_maps_out_with_a_warning(tmp_path):
    groups, entropy, words = [["dead"] * 9] * 2, [[0.5] * 9] * 2, {0: [["sky"] * 9] * 2, 2: [["sky"] * 9] * 2}
    a = _map_run(tmp_path / "clip", groups, entropy, words)
    b = _map_run(tmp_path / "siglip", groups, entropy, words)
    (b / "tokens.csv").write_bytes(b"sample_id,row,col\n\xff\xfe\x00broken\n")  # not UTF-8
    cmp = compare_runs([a, b], tmp_path / "cmp")
    assert cmp.maps == [] and len(cmp.warnings) == 1 and "'tokens' of one of the runs could not be read (UnicodeDecodeError" in cmp.warnings[0]
    assert cmp.html.is_file() and "could not be read" in cmp.html.read_text()


def test_a_csv_table_with_a_field_past_csvs_limit_leaves_its_maps_out_with_a_warning(tmp_path):
    """csv.Error (not an OSError or ValueError) from a hostile table: a warning, not a traceback."""
    groups, entropy, words = [["dead"] * 9] * 2, [[0.5] * 9] * 2, {0: [["sky"] * 9] * 2, 2: [["sky"] * 9] * 2}
    a = _map_run(tmp_path / "clip", groups, entropy, words)
    b = _map_run(tmp_path / "siglip", groups, entropy, words)
    (b / "tokens.csv").write_text("sample_id,row,col,group\ns0,0,0," + "x" * 200_000 + "\n")  # csv's limit: 131072
    cmp = compare_runs([a, b], tmp_path / "cmp")
    assert cmp.maps == [] and len(cmp.warnings) == 1 and "'tokens' of one of the runs could not be read (Error: field larger" in cmp.warnings[0]


def test_an_unreadable_effects_table_is_a_clear_error_with_exit_status_2(tmp_path):
    """`compare` on runs whose effects table is not UTF-8: exit 2 naming the file, no traceback, nothing written."""
    from typer.testing import CliRunner

    from embedlens.cli import app

    groups, entropy, words = [["dead"] * 9] * 2, [[0.5] * 9] * 2, {0: [["sky"] * 9] * 2, 2: [["sky"] * 9] * 2}
    runs = []
    for name in ("a", "b"):
        run = _map_run(tmp_path / name, groups, entropy, words)
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["tables"]["effects"] = "effects.csv"
        (run / "manifest.json").write_text(json.dumps(manifest))
        (run / "effects.csv").write_bytes(b"sample,condition,kl,kl_base\n\xff\xfe,c,1,0\n")
        runs.append(str(run))
    r = CliRunner().invoke(app, ["compare", *runs, "--output", str(tmp_path / "cmp")])
    assert r.exit_code == 2, r.output
    assert "effects.csv: the run's effects table cannot be read (UnicodeDecodeError" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "cmp").exists()


def test_words_that_look_like_mathtext_are_drawn_as_written(tmp_path, monkeypatch):
    """A table's word ``$\\foo$`` is text, not mathtext: the map is drawn (it stopped compare with a parse error) and
    its label shows the dollars."""
    from embedlens import figures

    groups, entropy = [["dead"] * 9] * 2, [[0.5] * 9] * 2
    words = {0: [["$\\foo$"] * 9] * 2, 2: [["$x^{$"] * 9] * 2}
    a = _map_run(tmp_path / "clip", groups, entropy, words)
    b = _map_run(tmp_path / "siglip", groups, entropy, words)
    got = {}
    save = figures._save

    def capture(fig, path, tight=True):
        got[path.name] = fig
        return save(fig, path, tight)

    monkeypatch.setattr(figures, "_save", capture)
    cmp = compare_runs([a, b], tmp_path / "cmp")
    assert "tokens_token_1_l0.png" in [p.name for p in cmp.maps] and all(p.is_file() for p in cmp.maps)
    fig = got["tokens_token_1_l0.png"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["\\$\\foo\\$"]  # an escaped dollar: matplotlib draws "$\foo$" as written

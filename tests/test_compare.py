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

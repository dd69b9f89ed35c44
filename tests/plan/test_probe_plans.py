"""The partition-study example runs end to end and its probes agree with each other."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from embedlens.errors import PlanError
from embedlens.plan import load_plan, prepare, run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _rows(path):
    with open(path.with_suffix(".csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_partition_study_example(tmp_path):
    work = tmp_path / "examples"
    shutil.copytree(EXAMPLES, work)
    result = run(prepare(load_plan(work / "partition_study.yaml")), out_dir=tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # the plan's partition discovered the same anchors the anchor_discovery probe ranks
    assert summary["partition"]["discovered_anchors"] == summary["anchor_discovery"]["anchors"]
    # every probe that reports per group saw the partition's groups, with the same counts
    counts = summary["token_partition"]["counts"]
    ent = summary["dead_token_entropy"]["groups"]
    assert {g: v["n_tokens"] for g, v in ent.items()} == {g: n for g, n in counts.items() if n}
    part_rows = _rows(result.tables["token_partition.tokens"])
    ent_rows = _rows(result.tables["dead_token_entropy.tokens"])
    assert [r["group"] for r in part_rows] == [r["group"] for r in ent_rows]
    assert summary["layer_alignment"]["recommended_layer"] in summary["layer_alignment"]["layers"]
    assert sum(summary["token_clusters"]["cluster_sizes"]) == len(part_rows)
    names = {p.name for p in result.figures}
    for want in ("token_partition_map.png", "sink_detector_layers.png", "attention_flow_last_token.png",
                 "logit_lens_entropy.png", "layer_alignment_cosine.png", "dead_token_entropy_hist.png"):
        assert want in names


def test_probe_parameter_errors_point_at_the_plan(tmp_path):
    shutil.copy(EXAMPLES / "data" / "shapes_0.png", tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text('{"id": "x", "image": "a.png", "question": "what is it?"}\n')
    base = "model: {source: 'tiny:llava-siglip'}\ndata: {prompts: p.jsonl}\nprobes:\n"
    cases = [
        ("  - {name: attention_flow, params: {vit_cls_layer: -2}}\n", r"plan.yaml:4 probes\[0\].params.vit_cls_layer: .*no CLS token"),
        ("  - {name: logit_lens, params: {layers: [9]}}\n", r"plan.yaml:4 probes\[0\].params.layers: layer 9 is out of range"),
        ("  - {name: token_clusters, params: {site: 'llm.layer[1]'}}\n", r"plan.yaml:4 probes\[0\].params.site: Unknown site"),
        ("  - {name: sink_detector, params: {sink_dims: [999]}}\n", r"plan.yaml:4 probes\[0\].params.sink_dims: \[999\] are outside"),
        ("  - {name: tuned_lens, params: {translators: nope.safetensors}}\n", r"plan.yaml:4 probes\[0\].params.translators: file not found"),
    ]
    for probe, expected in cases:
        (tmp_path / "plan.yaml").write_text(base + probe)
        with pytest.raises(PlanError, match=expected):
            prepare(load_plan(tmp_path / "plan.yaml"))

"""A table of malformed plans: each gets its own located error from `embedlens validate`, never a traceback."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedlens.cli import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

BASE = """\
model:
  source: tiny:llava-clip
data:
  prompts: prompts.jsonl
  padding_side: left
probes:
  - name: embedding_lens
    params:
      k: 2
      layers: [0, 1]
conditions:
  prune_even:
    - {name: prune, params: {tokens: "visual and index % 2 == 0"}}
metrics:
  - {name: next_token_kl}
output:
  dir: out
batch_size: 2
"""

# (id, replace this, by this, expected error: regex over the whole message)
CASES = [
    ("wrong type", "batch_size: 2", "batch_size: two", r"plan\.yaml:18 batch_size: Input should be a valid integer.*'two'"),
    ("unknown key", "batch_size: 2", "batch_size: 2\nbatchsize: 3", r"plan\.yaml:19 batchsize: unknown key\. Did you mean: batch_size\?"),
    ("unknown nested key", "  source: tiny:llava-clip", "  sorce: tiny:llava-clip", r"plan\.yaml:2 model\.sorce: unknown key\. Did you mean: source\?"),
    ("unknown probe", "  - name: embedding_lens", "  - name: embeding_lens", r"plan\.yaml:7 probes\[0\]\.name: Unknown probe 'embeding_lens'\. Did you mean: embedding_lens"),
    ("unknown intervention", "{name: prune, params", "{name: prun, params", r"plan\.yaml:13 conditions\.prune_even\[0\]\.name: Unknown intervention 'prun'"),
    ("unknown metric", "{name: next_token_kl}", "{name: next_token_kll}", r"plan\.yaml:15 metrics\[0\]\.name: Unknown metric 'next_token_kll'\. Did you mean: next_token_kl"),
    ("unknown parameter", "      k: 2", "      top_k: 2", r"plan\.yaml:9 probes\[0\]\.params\.top_k: embedding_lens has no parameter 'top_k'"),
    ("parameter type", "      k: 2", "      k: [2]", r"plan\.yaml:9 probes\[0\]\.params\.k: expected int, got \[2\]"),
    ("layer out of range", "      layers: [0, 1]", "      layers: [0, 40]", r"plan\.yaml:10 probes\[0\]\.params\.layers: layer 40 is out of range for this model \(0\.\.4"),
    ("missing file", "  prompts: prompts.jsonl", "  prompts: nothere.jsonl", r"plan\.yaml:4 data\.prompts: file not found: .*nothere\.jsonl"),
    ("empty data", "  prompts: prompts.jsonl", "  prompts: empty.jsonl", r"plan\.yaml:4 data\.prompts: .*empty\.jsonl is empty: no samples"),
    ("duplicate condition", "metrics:", "  prune_even:\n    - {name: prune, params: {tokens: visual}}\nmetrics:", r"plan\.yaml:14 conditions: duplicate key 'prune_even' \(first given on line 12\)"),
    ("yaml syntax", "      layers: [0, 1]", "      layers: [0, 1", r"plan\.yaml:\d+: YAML syntax error"),
    ("tab indentation", "      k: 2", "\tk: 2", r"plan\.yaml:9: YAML syntax error"),
    ("two data sources", "  padding_side: left", "  padding_side: left\n  synthetic: {n: 4}", r"plan\.yaml:3 data: give exactly one data source.*got prompts, synthetic"),
    ("model and models", "model:\n", "models: {a: {source: tiny:llava-clip}}\nmodel:\n", r"plan\.yaml:1 models: give either model \(one\) or models"),
    ("conditions without metrics", "metrics:\n  - {name: next_token_kl}\n", "", r"plan\.yaml:\d+ metrics: conditions need at least one metric"),
    ("condition named baseline", "  prune_even:", "  baseline:", r"plan\.yaml:12 conditions\.baseline: 'baseline' is the unmodified run"),
    ("bad selection", '{tokens: "visual and index % 2 == 0"}', '{tokens: "visual and idx < 3"}', r"plan\.yaml:13 conditions\.prune_even\[0\]\.params\.tokens: .*unknown name 'idx'.*Did you mean: index"),
    ("sweep unknown target", "batch_size: 2", "batch_size: 2\nsweep:\n  prune_odd.tokens: [visual]", r"plan\.yaml:20 sweep\.prune_odd\.tokens: 'prune_odd' is not a condition.*Did you mean: .*prune_even"),
    ("sweep unknown parameter", "batch_size: 2", "batch_size: 2\nsweep:\n  embedding_lens.kk: [1, 2]", r"plan\.yaml:20 sweep\.embedding_lens\.kk: embedding_lens has no parameter 'kk'"),
    ("sweep bad value", "batch_size: 2", "batch_size: 2\nsweep:\n  embedding_lens.layers: [[0], [0, 99]]", r"plan\.yaml:20 sweep\.embedding_lens\.layers\[1\]: layer 99 is out of range"),
    ("missing images folder", "  padding_side: left", "  padding_side: left\n  images: pics", r"plan\.yaml:6 data\.images: folder not found: .*pics"),
    ("bad record", "  prompts: prompts.jsonl", "  prompts: broken.jsonl", r"plan\.yaml:4 data\.prompts: .*broken\.jsonl:2: not valid JSON"),
    ("CLS on a SigLIP tower", "  source: tiny:llava-clip", "  source: tiny:llava-siglip", None),  # with the attention_flow probe below
    ("duplicate probe label", "conditions:", "  - {name: embedding_lens, params: {k: 1}}\nconditions:", r"plan\.yaml:11 probes\[1\]\.name: two probes would write tables named 'embedding_lens'"),
    ("synthetic out of range", "  prompts: prompts.jsonl", "  synthetic: {n: 4, background: 1.5}", r"plan\.yaml:4 data\.synthetic\.background: Input should be less than 1"),
    ("not a mapping", None, "- just\n- a list\n", r"plan\.yaml:1: a plan must be a mapping"),
]


@pytest.fixture
def workdir(tmp_path):
    shutil.copy(EXAMPLES / "data" / "shapes_0.png", tmp_path / "a.png")
    (tmp_path / "prompts.jsonl").write_text('{"id": "x", "image": "a.png", "question": "what is it?", "answer": "red"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "broken.jsonl").write_text('{"id": "x", "image": "a.png", "question": "what is it?"}\n{"id": "y", "image": \n')
    return tmp_path


def _validate(workdir: Path, text: str, *extra: str):
    plan = workdir / "plan.yaml"
    plan.write_text(text)
    return CliRunner().invoke(app, ["validate", str(plan), *extra])


def test_the_table_is_large_enough():
    assert len(CASES) >= 15
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_plan_gets_a_located_error(workdir, case):
    name, old, new, expected = case
    if old is None:
        text = new
    else:
        assert old in BASE, old
        text = BASE.replace(old, new, 1)
    deep = []
    if name == "CLS on a SigLIP tower":  # the tower's modules tell: listed by validate, refused by --deep
        text = text.replace("conditions:", "  - {name: attention_flow, params: {vit_cls_layer: -2}}\nconditions:")
        expected = r"plan\.yaml:11 probes\[1\].*vit_cls_layer.*CLS"
        r = _validate(workdir, text)
        assert r.exit_code == 0 and "the model's modules: probes[1] (attention_flow)" in r.output, r.output
        deep = ["--deep"]
    r = _validate(workdir, text, *deep)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    msg = r.output.strip()
    assert msg.startswith("error: "), msg
    assert re.search(expected, msg, flags=re.S), msg


def test_the_base_plan_is_valid(workdir):
    r = _validate(workdir, BASE)
    assert r.exit_code == 0, r.output
    assert "ok (model: llava model, 1 samples" in r.output

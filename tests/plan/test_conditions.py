"""Conditions and metrics in plans: located errors, and a run whose effects
table agrees with the engine run directly."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedlens.plan import load_plan, prepare, run
from tests.conftest import plan_error

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GOOD = """\
model:
  source: tiny:llava-clip
data:
  prompts: prompts.jsonl
conditions:
  prune_top:
    - name: prune
      params: {tokens: "visual and row == 0"}
  late:
    - {name: inject_at_layer, params: {layer: 2}}
metrics:
  - {name: answer_logprob}
  - {name: visual_tokens}
partition:
  anchors: {sink: [5], dead: [6]}
output:
  dir: out
batch_size: 2
"""


@pytest.fixture
def workdir(tmp_path):
    shutil.copy(EXAMPLES / "data" / "shapes_0.png", tmp_path / "a.png")
    (tmp_path / "prompts.jsonl").write_text(
        '{"id": "x", "image": "a.png", "question": "what is it?", "answer": "red"}\n'
        '{"id": "y", "image": "a.png", "question": "what colour is the circle?", "answer": "blue"}\n'
        '{"id": "z", "image": "a.png", "question": "count"}\n'
    )
    return tmp_path


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("{layer: 2}", "{layer: 40}", r"plan.yaml:10 conditions.late\[0\].params.layer: condition 'late' \(inject_at_layer\): layer 40 is out of range for this model \(0..3\)"),
        ("name: prune\n", "name: prun\n", r"plan.yaml:7 conditions.prune_top\[0\].name: Unknown intervention 'prun'. Did you mean: prune"),
        ("{tokens: \"visual and row == 0\"}", "{tokens: \"visual and rows == 0\"}", r"plan.yaml:8 conditions.prune_top\[0\].params.tokens: condition 'prune_top' \(prune\): unknown name 'rows'"),
        ("{layer: 2}", "{layr: 2}", r"plan.yaml:10 conditions.late\[0\].params.layr: inject_at_layer has no parameter 'layr'. Did you mean: layer\?"),
        ("{name: visual_tokens}", "{name: visual_token}", r"plan.yaml:13 metrics\[1\].name: Unknown metric 'visual_token'. Did you mean: visual_tokens"),
        ("dead: [6]", "dead: [60000]", r"plan.yaml:15 partition.anchors.dead: ids \[60000\] are outside the vocabulary"),
        ("  - {name: answer_logprob}\n  - {name: visual_tokens}\n", "  []\n", r"conditions need at least one metric"),
    ],
)
def test_bad_conditions_get_located_errors(workdir, old, new, expected):
    assert old in GOOD
    msg = plan_error(workdir, GOOD.replace(old, new))
    assert re.search(expected, msg), msg


def test_run_writes_effects(workdir):
    path = workdir / "plan.yaml"
    path.write_text(GOOD)
    result = run(prepare(load_plan(path)), workdir / "out")
    rows = list(csv.DictReader(open(result.tables["effects"].with_suffix(".csv"))))
    assert [(r["sample"], r["condition"]) for r in rows] == [
        ("x", "prune_top"), ("y", "prune_top"), ("x", "late"), ("y", "late"), ("z", "prune_top"), ("z", "late")
    ]
    for r in rows:
        want = 12 if r["condition"] == "prune_top" else 16  # a 4x4 grid, top row pruned
        assert int(r["visual_tokens_l0"]) == (want if r["condition"] == "prune_top" else 0)
        assert int(r["visual_tokens_l3"]) == want
    assert rows[4]["logprob"] == "nan"  # z has no answer
    eff = result.summary["effects"]
    assert eff["prune_top"]["visual_tokens_mean"] == 12.0
    x, y = (float(r["logprob_delta"]) for r in rows[:2])
    assert abs(eff["prune_top"]["logprob_delta"] - (x + y) / 2) < 1e-12


@pytest.mark.slow
def test_interventions_example_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "embedlens.cli", "run", str(EXAMPLES / "interventions.yaml"), "--output", str(tmp_path), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "effects.csv")))
    assert {r["condition"] for r in rows} == {
        "prune_even", "prune_even_random", "skip_mlp_0_1", "inject_at_2", "fastv", "prune_and_skip"
    }

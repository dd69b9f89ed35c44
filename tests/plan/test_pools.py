"""A matched control whose pool cannot supply its target's count is refused before the main pass, naming the plan line."""

from __future__ import annotations

from typer.testing import CliRunner

from embedlens.cli import app

PLAN = """
model: {source: tiny:llava-clip}
data: {synthetic: {n: 3, seed: 1, size: 64}}
conditions:
  top:
    - {name: prune, params: {tokens: "visual and row < 3"}}
  top_random:
    - {name: prune_random_matched, params: {target: "visual and row < 3"%s}}
metrics: [{name: next_token_kl}]
output: {dir: out}
batch_size: 2
"""


def test_short_pool_is_refused_before_the_main_pass(tmp_path):
    (tmp_path / "plan.yaml").write_text(PLAN % "")
    r = CliRunner().invoke(app, ["run", str(tmp_path / "plan.yaml")])
    assert r.exit_code == 2, r.output
    # 12 of the 16 tokens of a 4x4 grid are the target: 4 remain outside it
    assert "plan.yaml:8 conditions.top_random[0].params" in r.output and "has 12 target tokens" in r.output
    assert "only 4 pool tokens" in r.output and "exclude_target: false" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out" / "effects.parquet").exists() and "run " not in r.output.split("check: control pools")[-1]
    # drawn from the whole pool instead, the same plan runs, and the report gives the control's overlap with its target
    (tmp_path / "plan.yaml").write_text(PLAN % ", exclude_target: false")
    r = CliRunner().invoke(app, ["run", str(tmp_path / "plan.yaml"), "--overwrite", "--quiet"])
    assert r.exit_code == 0, r.output
    import json

    overlap = json.loads((tmp_path / "out" / "summary.json").read_text())["statistics"]["control_overlap"]["top_random"]
    assert 0 < overlap < 1

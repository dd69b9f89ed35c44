"""examples/video.yaml on tiny LLaVA-OneVision: a token's frame is its kept frame (no temporal merge), each frame
pooled to 2 x 2 tokens; pruning `visual and frame == 0` removes exactly frame 0's tokens of every video, and the
report draws one partition map per frame."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from embedlens.plan import load_plan, run_all

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "video.yaml"


def test_the_video_example_runs_on_tiny_onevision(tmp_path):
    plan = tmp_path / "video.yaml"
    text = EXAMPLE.read_text()
    assert "source: tiny:qwen2_vl" in text and "patch_grid: 4" in text
    # the ground truth at the model's token grid of a frame: 4 x 4 patches pooled to 2 x 2
    plan.write_text(text.replace("source: tiny:qwen2_vl", "source: tiny:llava_onevision").replace("patch_grid: 4", "patch_grid: 2"))
    out = tmp_path / "run"
    run_all(load_plan(plan), out)
    tokens = pd.read_parquet(out / "token_partition.tokens.parquet")
    cells = [(f, r, c) for f in range(8) for r in range(2) for c in range(2)]  # 8 kept frames of 32 px: 4 x 4 patches
    for _, t in tokens.groupby("sample_id"):
        assert sorted(zip(t.frame, t.row, t.col)) == cells
    touched = pd.read_parquet(out / "touched_tokens.parquet")
    assert touched.sample_id.nunique() == tokens.sample_id.nunique()
    for _, t in touched.groupby("sample_id"):
        frame0 = t[t.condition == "prune_frame0"]
        assert sorted(zip(frame0.frame, frame0.row, frame0.col)) == cells[:4]
        ctrl = t[t.condition == "prune_frame0_random"]
        assert len(ctrl) == 4 and (ctrl.frame > 0).all()
        top = t[t.condition == "prune_top1_random"]  # per frame: 2 tokens of frame 1 outside its top row
        assert len(top) == 2 and set(top.frame) == {1} and (top.row > 0).all()
    report = (out / "report.html").read_text()
    for f in range(8):
        assert (out / "figures" / f"token_partition_map_frame{f}.png").is_file() and f"token_partition_map_frame{f}.png" in report

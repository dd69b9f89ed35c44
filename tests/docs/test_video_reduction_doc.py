"""The token-reduction plan of docs/video.md runs as written: per-frame conditions keep their budget in every
frame and are paired with the per-frame random control, per-video ones with the per-video control."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import yaml

from embedlens.plan import load_plan, run_all

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "video.md"


def test_the_video_reduction_plan_keeps_its_budget_per_frame_and_per_video(tmp_path):
    section = GUIDE.read_text(encoding="utf-8").split("## Token reduction on a video", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    (tmp_path / "plan.yaml").write_text(block)
    out = tmp_path / "run"
    run_all(load_plan(tmp_path / "plan.yaml"), out)
    touched = pd.read_parquet(out / "touched_tokens.parquet")  # the removed tokens: 12 of each 16-token frame
    for cond in ("random_frame", "divprune_frame"):
        per_frame = touched[touched.condition == cond].groupby(["sample_id", "frame"]).size()
        assert len(per_frame) == 4 * 4 and (per_frame == 12).all(), cond
    for cond in ("random_video", "divprune_video"):
        per_video = touched[touched.condition == cond].groupby("sample_id").size()
        assert len(per_video) == 4 and (per_video == 48).all(), cond
    # fastv_budget drops inside the LLM from layer 1: its removed tokens, 12 of each frame, start there
    fastv = touched[touched.condition == "fastv_frame"].groupby(["sample_id", "frame"]).size()
    assert len(fastv) == 16 and (fastv == 12).all()
    tests = pd.read_parquet(out / "effect_tests.parquet")
    pairs = set(zip(tests.condition, tests.reference))
    assert {("divprune_frame", "random_frame"), ("fastv_frame", "random_frame"), ("divprune_video", "random_video")} <= pairs
    assert not {("divprune_frame", "random_video"), ("divprune_video", "random_frame")} & pairs
    board = pd.read_parquet(out / "leaderboard.parquet").set_index("condition")
    assert board.loc["divprune_video", "tokens"] == 16 and board.loc["divprune_video", "random"] == "random_video"
    # per frame, no per-image count of the budget: left empty, and the paper count is the measured one
    assert board.loc[["divprune_frame", "fastv_frame"], "tokens"].isna().all()
    assert board.loc["fastv_frame", "paper_tokens"] == board.loc["fastv_frame", "equivalent_tokens"]
    assert yaml.safe_load(block)["conditions"]["random_frame"][0]["params"]["per"] == "frame"

"""A data set that mixes image and video samples runs in one plan on tiny Qwen2-VL: batches hold both, the
partition covers every sample, and per-frame budgets keep their share of each video frame and of each image."""

from __future__ import annotations

import json

import pandas as pd

import embedlens
from embedlens.synthetic_video import SyntheticVideoSpec, save_video
from embedlens.testing.images import shapes


def test_a_plan_over_images_and_videos_together(tmp_path):
    save_video(SyntheticVideoSpec(n=3, frames=4, size=32, speed=2, patch_grid=4), str(tmp_path / "data"))
    prompts = tmp_path / "data" / "prompts.jsonl"
    lines = []
    for i, line in enumerate(prompts.read_text().splitlines()):  # video, image, video, image, ...
        shapes(32).save(tmp_path / "data" / f"img{i}.png")
        lines += [line, json.dumps({"id": f"img{i}", "image": f"img{i}.png", "question": "what shape is it?",
                                    "answer": "a circle", "candidates": ["a circle", "a square"]})]
    prompts.write_text("\n".join(lines) + "\n")
    plan = {
        "model": {"source": "tiny:qwen2_vl"},
        "data": {"prompts": "data/prompts.jsonl", "video": {"num_frames": 4}, "padding_side": "left"},
        "probes": [{"name": "embedding_lens", "params": {"k": 1, "layers": [0]}}],
        "conditions": {"prune_f0": [{"name": "prune", "params": {"tokens": "visual and frame == 0", "if_empty": "noop"}}],
                       "rand_frame": [{"name": "random_budget", "params": {"keep": 0.25, "per": "frame"}}]},
        "metrics": [{"name": "forced_choice"}],
        "output": {"dir": "out"},
        "batch_size": 4,  # batches of both kinds
    }
    embedlens.run(plan, base_dir=tmp_path, quiet=True)
    out = tmp_path / "out"
    tokens = pd.read_parquet(out / "tokens.parquet")
    # 4 frames of 32 px -> 2 temporal patches of 4 x 4 tokens; an image of 32 px -> 4 x 4 tokens
    n = tokens.groupby("sample_id").position.nunique().to_dict()
    assert n == {**{f"img{i}": 16 for i in range(3)}, **{s: 32 for s in n if s.startswith("vid")}} and len(n) == 6
    assert set(tokens[tokens.sample_id.str.startswith("img")].frame) == {-1}
    touched = pd.read_parquet(out / "touched_tokens.parquet")
    f0 = touched[touched.condition == "prune_f0"]
    assert set(f0.sample_id) == {s for s in n if s.startswith("vid")} and set(f0.frame) == {0} and len(f0) == 3 * 16
    kept = touched[touched.condition == "rand_frame"].groupby(["sample_id", "frame"]).size()
    assert len(kept) == 3 + 3 * 2 and (kept == 12).all()  # 12 of 16 removed from each image and each frame

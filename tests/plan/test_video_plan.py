"""A plan over the synthetic video set on tiny Qwen2-VL: video samples load with data.video's settings, probes
run, and pruning `visual and frame == 0` removes exactly the first temporal patch's tokens of every sample."""

from __future__ import annotations

import pandas as pd

import embedlens
from embedlens.synthetic_video import SyntheticVideoSpec, save_video


def test_a_video_plan_prunes_one_temporal_patch(tmp_path):
    save_video(SyntheticVideoSpec(n=3, frames=6, size=32, speed=2, patch_grid=4), str(tmp_path / "data"))
    plan = {
        "model": {"source": "tiny:qwen2_vl"},
        "data": {"prompts": "data/prompts.jsonl", "video": {"num_frames": 4}},
        "probes": [{"name": "embedding_lens", "params": {"k": 2, "layers": [0]}}],
        "conditions": {"prune_first": [{"name": "prune", "params": {"tokens": "visual and frame == 0"}}]},
        "metrics": [{"name": "next_token_kl"}],
        "output": {"dir": "out"},
        "batch_size": 2,
    }
    embedlens.run(plan, base_dir=tmp_path, quiet=True)
    out = tmp_path / "out"
    # 6 frames kept as 4 -> 2 temporal patches of 4 x 4 tokens (32-px frames, 4-px patches merged 2 x 2)
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert tokens.groupby("sample_id").position.nunique().tolist() == [32, 32, 32]
    touched = pd.read_parquet(out / "touched_tokens.parquet")
    assert set(touched.sample_id) == set(tokens.sample_id)
    for _, t in touched.groupby("sample_id"):
        assert sorted(t["index"]) == list(range(16))  # the first 16 visual tokens: temporal patch 0
        assert sorted(zip(t.row, t.col)) == [(r, c) for r in range(4) for c in range(4)]
        assert set(t.frame) == {0}

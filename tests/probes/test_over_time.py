"""A video's places over time: what each place shows (static background, static object, moving) against the
frames' own pixels, and one token map per temporal patch in every probe that draws token maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedlens import load_model
from embedlens.probes.over_time import CONTENT, content_grid, place_content, places
from embedlens.synthetic_video import SyntheticVideoSpec, make_video_records

SPEC = SyntheticVideoSpec(n=6, frames=8, size=32, speed=2, still_rate=0.5, patch_grid=4, seed=3)


@pytest.fixture(scope="module")
def videos():
    from embedlens.video import VideoOptions

    return [r.load(video=VideoOptions(num_frames=6))[0] for r in make_video_records(SPEC)]  # 6 of 8 frames kept


def test_a_static_place_has_the_same_pixels_in_every_kept_frame(videos):
    """Independent truth: each 8 x 8 pixel block of the kept frames. A place called static (background or object)
    never changes; every place whose pixels change is called moving; static objects and background are told
    apart by the per-frame truth; the set has all three."""
    seen = set()
    for s in videos:
        grid = content_grid(s)
        assert grid is not None and grid.shape == (4, 4)
        px = np.stack([np.asarray(f, dtype=np.int16) for f in s.video.frames])  # [kept frames, 32, 32, 3]
        kinds = s.meta["frame_patch_labels"]["kind"]
        for r in range(4):
            for c in range(4):
                block = px[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8]
                changes = bool((block != block[:1]).any())
                name = CONTENT[int(grid[r, c])]
                seen.add(name)
                assert not (changes and name != "moving"), (s.id, r, c, name)
                if name == "static_background":
                    assert all(kinds[f][r][c] == "background" for f in s.video.indices)
                if any(kinds[f][r][c] == "object" for f in s.video.indices) and name != "moving":
                    assert name == "static_object"
    assert seen == set(CONTENT)


def test_places_without_truth_or_on_another_grid_are_unknown(videos):
    import dataclasses

    adapter = load_model("tiny:qwen2_vl")
    other = dataclasses.replace(videos[1], meta={**videos[1].meta, "frame_patch_labels": {"kind": [[["background"] * 2] * 2] * 8}})
    bare = dataclasses.replace(videos[2], meta={})
    batch = adapter.encode([videos[0], other, bare])
    _, _, keys = places(batch.roles.visual_tokens())
    got = place_content(batch, keys)
    assert (got[keys[:, 0] == 0] >= 0).all()
    assert got[keys[:, 0] == 0].tolist() == content_grid(videos[0]).flatten().tolist()  # keys are row-major
    assert (got[keys[:, 0] > 0] == -1).all()  # a 2 x 2 truth grid for 4 x 4 tokens; no truth at all


@pytest.mark.parametrize("name,stem", [("sink_detector", "sink_detector_map"), ("dead_token_entropy", "dead_token_entropy_map"),
                                       ("attention_flow", "attention_flow_last_token"), ("token_clusters", "token_clusters_map")])
def test_every_token_map_is_drawn_frame_by_frame(videos, name, stem, tmp_path):
    """A video's token map: one figure per temporal patch (6 kept frames: 3), none for the whole video."""
    from embedlens.registry import probes
    from embedlens.tracing import collect

    adapter = load_model("tiny:qwen2_vl")
    batch = adapter.encode(videos[:2], padding_side="left")
    probe = probes.get(name)()
    probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))
    maps = sorted(p.name for p in probe.figures(tmp_path) if p.name.startswith(stem))
    assert maps == [f"{stem}_frame{t}.png" for t in range(3)]
    if name == "token_clusters":  # each frame's map labels that frame's 16 tokens
        assert torch.equal(torch.bincount(probe._first_frame), torch.tensor([16, 16, 16]))

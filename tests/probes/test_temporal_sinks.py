"""SToP's temporal sink score on tiny Qwen2-VL, planted: one place made an attention sink in every temporal patch
scores 1, one made a stronger sink in a single temporal patch scores less; both against HF's own eager attention
weights, pooled and normalised by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens import load_model
from embedlens.data import Sample
from embedlens.probes.temporal_sinks import TemporalSinks

GRID = 4  # 32-px frames, 4-px patches merged 2 x 2: 4 x 4 tokens (8 x 8 patches) per temporal patch
PERSISTENT, ONCE = (1, 2), (3, 0)  # (row, col) of the planted places
ONCE_FRAME = 1


def _patches_of(place: tuple[int, int], frame: int) -> list[int]:
    """The packed tower rows of a place's 2 x 2 patch block in temporal patch `frame` (HF's merge-unit order:
    each token's 4 patches consecutive, tokens row-major)."""
    token = place[0] * GRID + place[1]
    return [frame * GRID * GRID * 4 + token * 4 + i for i in range(4)]


@pytest.fixture(scope="module")
def planted():
    """The feature layer made position-free (rotary cos 1, sin 0) with every query one vector u per head; the
    keys of PERSISTENT's patches are 6u in every temporal patch, ONCE's 12u in temporal patch 1 only."""
    import transformers.models.qwen2_vl.modeling_qwen2_vl as hf

    adapter = load_model("tiny:qwen2_vl")
    rng = np.random.default_rng(0)
    frames = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(6)]  # 3 temporal patches
    batch = adapter.encode([Sample(video=frames, question="what moves?", id="v")])
    attn = adapter.model.model.visual.blocks[-1].attn
    heads, dim = attn.num_heads, attn.qkv.in_features
    u = torch.randn(dim, generator=torch.Generator().manual_seed(0))

    def no_rotary(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return args, {**kwargs, "position_embeddings": (torch.ones_like(cos), torch.zeros_like(sin))}

    def plant(module, args, out):
        q, k, v = out.clone().reshape(out.shape[0], 3, dim).unbind(1)
        q[:] = u
        for t in range(3):
            k[_patches_of(PERSISTENT, t)] = 6 * u
        k[_patches_of(ONCE, ONCE_FRAME)] = 12 * u
        return torch.stack([q, k, v], 1).reshape(out.shape)

    weights = []

    def eager(module, *a, **kw):
        out, w = real_eager(module, *a, **kw)
        weights.append(w.detach())  # [1, heads, frame's patches, frame's patches], one per temporal patch
        return out, w

    real_eager = hf.eager_attention_forward
    handles = [attn.register_forward_pre_hook(no_rotary, with_kwargs=True), attn.qkv.register_forward_hook(plant)]
    old_impl = attn.config._attn_implementation
    try:
        probe = TemporalSinks()
        probe.check(adapter)
        tables = probe.update(adapter, batch, {})
        attn.config._attn_implementation = "eager"
        hf.eager_attention_forward = eager
        with torch.no_grad():
            adapter.model.model.visual(batch.inputs["pixel_values_videos"], grid_thw=batch.inputs["video_grid_thw"])
    finally:
        hf.eager_attention_forward = real_eager
        attn.config._attn_implementation = old_impl
        for h in handles:
            h.remove()
    n_layers = len(adapter.model.model.visual.blocks)  # the blocks share one config: every layer ran eager
    assert len(weights) == 3 * n_layers and heads == weights[-1].shape[1]
    return probe, tables, torch.stack([w[0] for w in weights[-3:]])  # [frames, heads, queries, keys]


def _by_hand(weights: torch.Tensor, gamma: float = 1.1) -> tuple[torch.Tensor, torch.Tensor]:
    """([frames, tokens] attention each token draws, [tokens] SToP score) from HF's attention weights."""
    received = weights.double().mean(1).mean(1)  # head mean, query mean: [frames, patches]
    per_token = received.reshape(3, GRID * GRID, 4).mean(-1)  # the token's 2 x 2 patches
    x = per_token.mean(0) ** gamma
    return per_token, (x - x.min()) / (x.max() - x.min() + 1e-12)


def test_the_sink_score_equals_stops_formula_on_hfs_own_attention(planted):
    probe, tables, weights = planted
    want_attention, want_score = _by_hand(weights)
    tok = tables["tokens"]
    got = torch.zeros(3, GRID * GRID, dtype=torch.float64)
    for f, r, c, a in zip(tok["frame"], tok["row"], tok["col"], tok["attention"]):
        got[f, r * GRID + c] = a
    assert torch.allclose(got, want_attention, atol=1e-6)
    places = tables["places"]
    assert [(r, c) for r, c in zip(places["row"], places["col"])] == [(r, c) for r in range(GRID) for c in range(GRID)]
    assert places["n_frames"] == [3] * GRID * GRID
    assert torch.allclose(torch.tensor(places["sink_score"], dtype=torch.float64), want_score, atol=1e-6)
    assert torch.allclose(torch.tensor(places["mean_attention"], dtype=torch.float64), want_attention.mean(0), atol=1e-6)
    # every token carries its place's score, the same in each frame
    for r, c, s in zip(tok["row"], tok["col"], tok["sink_score"]):
        assert s == pytest.approx(float(want_score[r * GRID + c]), abs=1e-6)


def test_a_persistent_sink_outscores_a_stronger_sink_of_one_frame(planted):
    probe, tables, _ = planted
    places = tables["places"]
    score = {(r, c): s for r, c, s in zip(places["row"], places["col"], places["sink_score"])}
    tok = tables["tokens"]
    in_frame = {(f, r, c): a for f, r, c, a in zip(tok["frame"], tok["row"], tok["col"], tok["attention"])}
    assert in_frame[(ONCE_FRAME, *ONCE)] > 2 * in_frame[(ONCE_FRAME, *PERSISTENT)]  # in its one frame, ONCE draws more
    assert score[PERSISTENT] == pytest.approx(1.0)  # the most persistent place of the video
    assert 0.2 < score[ONCE] < 0.8  # one frame of three: a third of the persistent one's mean, give or take
    assert all(s < 0.05 for p, s in score.items() if p not in (PERSISTENT, ONCE))
    res = probe.result()
    assert res["n_videos"] == 1 and res["n_places"] == GRID * GRID and res["vision_layer"] == 2
    assert [(p["row"], p["col"]) for p in res["top_places"][:2]] == [PERSISTENT, ONCE]
    assert "by_content" not in res  # random frames: no truth, no static / moving split


def test_one_attention_map_per_temporal_patch_and_a_score_map(planted, tmp_path):
    probe, _, _ = planted
    paths = probe.figures(tmp_path)
    assert sorted(p.name for p in paths) == ["temporal_sinks_map_frame0.png", "temporal_sinks_map_frame1.png",
                                             "temporal_sinks_map_frame2.png", "temporal_sinks_score.png"]
    assert all(p.is_file() for p in paths)


def test_images_are_left_out_and_bad_parameters_are_named():
    from embedlens.errors import PlanError
    from embedlens.testing import tiny_batch

    adapter, batch = tiny_batch("qwen2-vl", n=2)
    probe = TemporalSinks()
    assert probe.update(adapter, batch, {}) == {} and probe.result()["n_places"] == 0 and probe.figures(".") == []
    with pytest.raises(PlanError, match=r"temporal_sinks\.gamma: must be a finite number > 0; got 0"):
        TemporalSinks(gamma=0)
    with pytest.raises(PlanError, match=r"temporal_sinks\.vision_layer: layer 9 is out of range for this model \(0\.\.2\)"):
        TemporalSinks(vision_layer=9).check(adapter)


def test_the_tower_runs_once_per_batch():
    """The probe recomputes the feature layer's attention from its own run of the tower; the activations the runner
    collects for it (`collect` at its `sites`) must not cost a second run: the first tower block runs once per batch."""
    from embedlens.adapters.base import resolve_path
    from embedlens.tracing import collect

    adapter = load_model("tiny:qwen2_vl")
    rng = np.random.default_rng(2)
    frames = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(4)]
    batch = adapter.encode([Sample(video=frames, question="what?", id="v")])
    runs = []
    handle = resolve_path(adapter.model, adapter.paths.vision_layers)[0].register_forward_hook(lambda *_: runs.append(1))
    try:
        probe = TemporalSinks()
        probe.check(adapter)
        out = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))
    finally:
        handle.remove()
    assert len(out["places"]["sink_score"]) == GRID * GRID and len(runs) == 1

def test_the_host_waits_as_often_for_six_temporal_patches_as_for_two():
    """The score's hot path (the tower's attention recomputed per frame, then per place) has no loop over frames or
    tokens that reads the device: `torch.profiler`'s count of host syncs is the same for 2 and 6 temporal patches."""
    from torch.profiler import ProfilerActivity, profile

    from embedlens.probes.over_time import sink_persistence
    from embedlens.probes.temporal_sinks import tower_attention_received

    adapter = load_model("tiny:qwen2_vl")
    rng = np.random.default_rng(1)
    counts = {}
    for n in (4, 12):
        frames = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(n)]
        batch = adapter.encode([Sample(video=frames, question="what?", id="v")])
        vt = batch.roles.visual_tokens()
        attention = torch.rand(len(vt["frame"]))

        def fn():
            tower_attention_received(adapter, batch, 2)
            sink_persistence(vt, attention, 1.1)

        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        counts[n] = sum(e.count for e in prof.key_averages() if e.key in ("aten::item", "aten::_local_scalar_dense", "aten::nonzero"))
    assert counts[4] == counts[12], f"host syncs by number of frames: {counts}"


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_the_score_on_a_clip_or_siglip_tower_pools_each_tokens_patches(family):
    """LLaVA-OneVision (SigLIP) and LLaVA-NeXT-Video (CLIP, with [CLS], features from layer -2) run each frame
    through the tower as an image and pool its patch grid 2 x 2: each token's attention is the mean over its 2 x 2
    patches of the attention they receive at the feature layer (every query, [CLS] too), from HF's own eager
    attention weights (``output_attentions``), then SToP's formula per place over the frames."""
    adapter = load_model(f"tiny:{family}")
    rng = np.random.default_rng(2)
    frames = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    batch = adapter.encode([Sample(video=frames, question="what moves?", id="v")])
    probe = TemporalSinks()
    tables = probe.update(adapter, batch, {})
    layer = probe.result()["vision_layer"]
    tower = adapter.model.model.vision_tower
    old = tower.config._attn_implementation
    try:
        tower.config._attn_implementation = "eager"
        with torch.no_grad():
            out = tower(batch.inputs["pixel_values_videos"][0], output_attentions=True)
    finally:
        tower.config._attn_implementation = old
    received = out.attentions[layer].double().mean(1).mean(1)[:, adapter.n_prefix_tokens:]  # [frames, patches]: head, query mean
    side = int(received.shape[1] ** 0.5)
    grid = received.reshape(3, side // 2, 2, side // 2, 2).mean((2, 4)).flatten(1)  # [frames, tokens]: 2 x 2 means
    x = grid.mean(0) ** 1.1
    want = (x - x.min()) / (x.max() - x.min() + 1e-12)
    n = side // 2
    tok = tables["tokens"]
    got = torch.zeros_like(grid)
    for f, r, c, a in zip(tok["frame"], tok["row"], tok["col"], tok["attention"]):
        got[f, r * n + c] = a
    assert torch.allclose(got, grid, atol=1e-6)
    places = tables["places"]
    assert [(r, c) for r, c in zip(places["row"], places["col"])] == [(r, c) for r in range(n) for c in range(n)]
    assert torch.allclose(torch.tensor(places["sink_score"], dtype=torch.float64), want, atol=1e-6)


def test_a_batch_of_images_and_a_video_scores_the_video_as_alone():
    """Qwen-VL runs a mixed batch's tower twice (its images, then its videos): the video's attention and scores are
    those of the video in a batch of its own, and the image is left out."""
    from embedlens.testing.images import shapes

    adapter = load_model("tiny:qwen2_vl")
    rng = np.random.default_rng(3)
    frames = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(4)]
    video = Sample(video=frames, question="what moves?", id="v")
    alone = TemporalSinks().update(adapter, adapter.encode([video]), {})
    mixed = TemporalSinks().update(adapter, adapter.encode([Sample([shapes(32, seed=0)], question="what?", id="i"), video],
                                                           padding_side="left"), {})
    assert set(mixed["tokens"]["sample_id"]) == {"v"} and set(mixed["places"]["sample_id"]) == {"v"}
    for table, col in (("tokens", "attention"), ("places", "sink_score")):
        assert mixed[table][col] == pytest.approx(alone[table][col], abs=1e-6)

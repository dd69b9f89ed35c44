"""LLaVA-NeXT-Video: the frame pixels against HF's video processing written out, each video token on its true frame
and pooled patch block (one frame's patch perturbed), sites and scattered features equal to HF's own forward, the
engine's logits equal to HF's with left and right padding (video and image batches), and pruning a frame equal to
HF's model on the shortened sequence; on embedlens's tiny model and HF's tester configuration (average pooling, and
the learned ``conv`` pooling). The image path's family-wide proofs run on the tester entry ``llava_next_video`` in
tests/adapters/test_hf_configs.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens.adapters import LlavaNextVideoAdapter, load_model, wrap_model
from embedlens.adapters.base import resolve_path
from embedlens.adapters.capabilities import Capability
from embedlens.adapters.llava_next_video import frame_processor
from embedlens.data import Sample
from embedlens.errors import AdapterError, InputError
from embedlens.interventions import Engine
from embedlens.interventions.prune import Prune
from embedlens.sites import Site
from embedlens.testing.images import shapes
from embedlens.tracing import collect
from embedlens.video import Video
from tests.support.hf_testers import llava_next_video_builder

TOL = dict(atol=1e-5, rtol=1e-4)


def _frames(n: int, h: int, w: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module", params=["tiny", "tester", "tester-conv"])
def lnv(request):
    if request.param == "tiny":
        adapter = load_model("tiny:llava_next_video")
    else:
        adapter = wrap_model(*llava_next_video_builder("conv" if request.param == "tester-conv" else "average")(0))
    assert type(adapter) is LlavaNextVideoAdapter and adapter.has(Capability.VIDEO)
    adapter.side = int(adapter.config.vision_config.image_size)
    return adapter


def _samples(lnv, n_frames=(3, 3)):
    s = lnv.side
    sizes = [(s, s), (s + 4, s + 9), (s + 8, s)]  # as the tower takes them, wider (resized, cropped), taller
    questions = ["count the shapes", "what?", "is it red?"]
    return [Sample(video=_frames(n, *sizes[i], seed=i), question=questions[i], id=f"v{i}") for i, n in enumerate(n_frames)]


def _batch(lnv, n_frames=(3, 3), padding_side="left"):
    return lnv.encode(_samples(lnv, n_frames), padding_side=padding_side)


def test_frames_are_hfs_video_processing_written_out(lnv):
    """HF's `LlavaNextVideoVideoProcessor` steps written out with PIL and numpy: the shortest edge resized to
    ``size`` (bicubic, the long side ``int(size * long / short)``), the centre ``crop_size`` cut at
    ``int((H - h) / 2)``, then ``(x / 255 - mean) / std``; and HF's processor's own count of video tokens."""
    fp = lnv.processor.frame_processor
    side = lnv.side
    mean, std = np.array(fp.image_mean)[:, None, None], np.array(fp.image_std)[:, None, None]
    for h, w in ((side, side), (side + 4, side + 9), (side + 8, side)):
        frames = _frames(2, h, w, seed=h)
        short, long = min(h, w), max(h, w)
        nh, nw = (side, int(side * long / short)) if h <= w else (int(side * long / short), side)
        top, left = int((nh - side) / 2), int((nw - side) / 2)
        want = []
        for f in frames:
            x = np.asarray(f.resize((nw, nh), Image.BICUBIC) if (nh, nw) != (h, w) else f, dtype=np.float64)
            x = x.transpose(2, 0, 1)[:, top:top + side, left:left + side] / 255.0
            want.append((x - mean) / std)
        got = lnv.video_inputs([Video(frames)])["pixel_values_videos"]
        assert tuple(got.shape) == (1, 2, 3, side, side)
        torch.testing.assert_close(got[0].double(), torch.tensor(np.stack(want)), atol=1e-5, rtol=0)
    batch = _batch(lnv, padding_side="right")
    pv = batch.inputs["pixel_values_videos"]
    for b in range(pv.shape[0]):  # HF's processor's expansion of each video's placeholder (its pooling stride is 2)
        hf = lnv.processor.replace_video_token({"pixel_values_videos": pv}, video_idx=b)
        assert int((batch.input_ids[b] == lnv.video_token_id).sum()) == hf.count(lnv.video_placeholder)


def test_role_map_puts_each_token_on_its_frame_and_block(lnv):
    batch = _batch(lnv, n_frames=(3, 2))  # different frame counts: one packed row of frames
    roles, ids = batch.roles, batch.input_ids
    assert tuple(batch.inputs["pixel_values_videos"].shape[:2]) == (1, 5)
    assert (ids[roles.visual] == lnv.video_token_id).all() and not (ids == lnv.image_token_id).any()
    g = lnv.side // int(lnv.config.vision_config.patch_size) // int(lnv.config.spatial_pool_stride)  # tokens per side
    first = 0
    for b, n in enumerate((3, 2)):
        vis = roles.visual[b]
        k = torch.arange(n * g * g)
        assert torch.equal(roles.frame[b][vis], k // (g * g))
        assert torch.equal(roles.row[b][vis], (k % (g * g)) // g) and torch.equal(roles.col[b][vis], k % g)
        assert torch.equal(roles.feature_row[b][vis], first + k // (g * g)) and torch.equal(roles.feature_col[b][vis], k % (g * g))
        assert (roles.frame[b][~vis] == -1).all() and (roles.image[b][vis] == 0).all()
        first += n
    assert lnv.image_grids(batch.inputs) == [(g, g), (g, g)]
    assert lnv.tokenizer.decode(ids[0][roles.question[0]]).replace(" ", "") == "counttheshapes"


def test_one_frames_patch_reaches_exactly_its_token(lnv):
    """Invert one patch of one frame in `pixel_values_videos`:
    - the patch embedding (`vision.embed`) changes in exactly that frame's row and patch, which is in the block
      `patch_indices` gives the one token the role map puts at (frame, row // s, col // s), and in no other's;
    - the LLM's input changes at exactly that frame's tokens of that sample (the tower mixes a frame's patches);
    - a change of that patch's row of the features layer's output changes the projector output, and the LLM's
      input, at exactly that token (the model's own pooling)."""
    batch = _batch(lnv, n_frames=(3, 3))
    vt = batch.roles.visual_tokens()
    p, s = int(lnv.config.vision_config.patch_size), int(lnv.config.spatial_pool_stride)
    n = lnv.side // p  # patches per side
    pv = batch.inputs["pixel_values_videos"]
    base = collect(lnv, batch, ["vision.embed", "projector", "llm.embed"])
    feature_layer = resolve_path(lnv.model, lnv.paths.vision_layers)[lnv.vision_layers_needed - 1]
    for b, f, pr, pc in ((0, 0, 0, 0), (0, 2, n - 1, 1), (1, 1, 2 % n, n - 1), (1, 0, n // 2, n // 2 + 1)):
        changed = pv.clone()
        changed[b, f, :, pr * p:(pr + 1) * p, pc * p:(pc + 1) * p] *= -1
        batch.inputs["pixel_values_videos"] = changed
        try:
            acts = collect(lnv, batch, ["vision.embed", "llm.embed"])
        finally:
            batch.inputs["pixel_values_videos"] = pv
        row = b * pv.shape[1] + f
        where = (acts[Site("vision.embed")] - base[Site("vision.embed")]).abs().amax(-1).nonzero().tolist()
        assert where == [[row, lnv.n_prefix_tokens + pr * n + pc]], (b, f, pr, pc, where)
        token = (vt["sample"] == b) & (vt["frame"] == f) & (vt["row"] == pr // s) & (vt["col"] == pc // s)
        assert int(token.sum()) == 1 and int(vt["feature_row"][token]) == row
        assert pr * n + pc in lnv.patch_indices(vt["feature_col"][token], batch.inputs)[0].tolist()
        assert not (lnv.patch_indices(vt["feature_col"][~token & (vt["feature_row"] == row)], batch.inputs) == pr * n + pc).any()
        moved = (acts[Site("llm.embed")] - base[Site("llm.embed")]).abs().amax(-1) > 0
        assert torch.equal(moved.nonzero(), torch.stack([vt["sample"], vt["position"]], 1)[(vt["sample"] == b) & (vt["frame"] == f)])

        def bump(module, args, out, row=row, patch=lnv.n_prefix_tokens + pr * n + pc):
            h = out[0] if isinstance(out, tuple) else out
            h[row, patch] += 1.0

        handle = feature_layer.register_forward_hook(bump)
        try:
            acts = collect(lnv, batch, ["projector", "llm.embed"])
        finally:
            handle.remove()
        where = (acts[Site("projector")] - base[Site("projector")]).abs().amax(-1).nonzero().tolist()
        assert where == [[row, int(vt["feature_col"][token])]], where
        moved = (acts[Site("llm.embed")] - base[Site("llm.embed")]).abs().amax(-1).nonzero().tolist()
        assert moved == [[b, int(vt["position"][token])]]


def test_sequence_positions_receive_their_tokens_features(lnv):
    """`llm.embed` at each video token is exactly the projector's row the role map names (HF scatters in order)."""
    batch = _batch(lnv, n_frames=(3, 2))
    acts = collect(lnv, batch, ["projector", "llm.embed", "vision.features"])
    vt = batch.roles.visual_tokens()
    torch.testing.assert_close(acts[Site("llm.embed")][vt["sample"], vt["position"]],
                               acts[Site("projector")][vt["feature_row"], vt["feature_col"]], atol=0, rtol=0)
    # `vision.features` holds one row per video token: what the projector turns into that token
    proj = lnv.model.model.multi_modal_projector
    from embedlens.probes._util import visual_rows

    with torch.no_grad():
        torch.testing.assert_close(proj(visual_rows(lnv, Site("vision.features"), acts[Site("vision.features")], vt, batch.inputs)),
                                   acts[Site("llm.embed")][vt["sample"], vt["position"]], **TOL)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sites_equal_hf_hidden_states(lnv, padding_side):
    batch = _batch(lnv, padding_side=padding_side)
    n = lnv.n_llm_layers
    acts = collect(lnv, batch, [f"llm.layers[{i}]" for i in range(n)] + ["llm.embed", "llm.unembed"])
    with torch.no_grad():
        out = lnv.model(**lnv.model_inputs(batch), output_hidden_states=True)
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(acts[Site("llm.embed")][valid], out.hidden_states[0][valid], atol=0, rtol=0)
    for i in range(n - 1):  # the last layer's output is normed in HF's hidden_states
        torch.testing.assert_close(acts[Site("llm.layers", i)][valid], out.hidden_states[i + 1][valid], **TOL)
    torch.testing.assert_close(acts[Site("llm.unembed")][valid], out.logits[valid], **TOL)
    # the tower on the batch's frames, HF's own pooler and projector
    m = lnv.model.model
    frames = batch.inputs["pixel_values_videos"].flatten(0, 1)
    vision = collect(lnv, batch, [f"vision.layers[{i}]" for i in range(lnv.n_vision_layers)] + ["vision.features", "projector"])
    with torch.no_grad():
        tower = m.vision_tower(frames, output_hidden_states=True)
        feats = m.vision_resampler(tower.hidden_states[lnv.config.vision_feature_layer][:, 1:])
        proj = m.multi_modal_projector(feats)
    for i in range(lnv.vision_layers_needed):  # later layers are skipped: nothing reads them
        torch.testing.assert_close(vision[Site("vision.layers", i)], tower.hidden_states[i + 1], **TOL)
    torch.testing.assert_close(vision[Site("vision.features")], feats, **TOL)
    torch.testing.assert_close(vision[Site("projector")], proj, **TOL)


@pytest.mark.parametrize("kind", ["video", "image"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_engine_logits_equal_hf_at_batch_2(lnv, kind, padding_side):
    if kind == "video":
        batch = _batch(lnv, n_frames=(3, 2), padding_side=padding_side)
    else:
        batch = lnv.encode([Sample([shapes(lnv.side + 6, seed=1)], question="what is it?", id="i0"),
                            Sample([shapes(lnv.side, seed=2)], question="count the shapes", id="i1")], padding_side=padding_side)
    with torch.no_grad():
        ref = lnv.model(**lnv.model_inputs(batch)).logits
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(Engine(lnv).run(batch).logits()[valid], ref[valid], atol=1e-4, rtol=1e-4)
    if kind == "video" and padding_side == "left":
        ours = Engine(lnv).run(batch, cache=True).generate(3)
        with torch.no_grad():
            hf = lnv.model.generate(**lnv.model_inputs(batch), max_new_tokens=3, do_sample=False)[:, batch.input_ids.shape[1]:]
        assert torch.equal(ours, hf)


def test_videos_of_different_lengths_give_each_sample_its_own_logits(lnv):
    """The packed row of a batch whose videos differ in length: each sample's logits are those it gets alone."""
    samples = _samples(lnv, (3, 2))
    batch = lnv.encode(samples, padding_side="right")
    with torch.no_grad():
        logits = lnv.model(**lnv.model_inputs(batch)).logits
        for b, s in enumerate(samples):
            alone = lnv.encode([s])
            n = alone.input_ids.shape[1]
            torch.testing.assert_close(logits[b, :n], lnv.model(**lnv.model_inputs(alone)).logits[0], **TOL)


def test_pruning_one_frame_equals_hf_on_the_shortened_sequence(lnv):
    """Pruning `visual and frame == 1` gives the logits of HF's language model run on its own input embeddings with
    those positions cut out, the others keeping their positions."""
    batch = _batch(lnv, n_frames=(3,), padding_side="left")
    pruned = Engine(lnv).run(batch, [Prune(tokens="visual and frame == 1")])
    keep = ~((batch.roles.frame == 1) & batch.roles.visual)[0]
    assert int((~keep).sum()) == len(lnv.image_layouts(batch.inputs)[0]) // 3
    with torch.no_grad():
        embeds = lnv.model(**lnv.model_inputs(batch), output_hidden_states=True).hidden_states[0]
        h = lnv.model.model.language_model(inputs_embeds=embeds[:, keep], position_ids=torch.arange(len(keep))[keep][None])
        logits = lnv.model.lm_head(h.last_hidden_state)
    torch.testing.assert_close(pruned.last_logits(), logits[:, -1], atol=1e-4, rtol=1e-4)


def test_video_errors(lnv):
    with pytest.raises(InputError, match=r"image samples or video samples, not both; .*\(set batch_size: 1"):
        lnv.encode([Sample([shapes(32)], question="q", id="i"), Sample(video=_frames(2, lnv.side, lnv.side), question="q", id="v")])
    with pytest.raises(InputError, match="one video placeholder"):
        lnv.encode([Sample(video=_frames(2, lnv.side, lnv.side), prompt="no placeholder here", id="v")])
    own = lnv.processor.frame_processor
    lnv.processor.frame_processor = frame_processor(dict(size={"shortest_edge": 2 * lnv.side}, crop_size={"height": 2 * lnv.side, "width": 2 * lnv.side}))
    try:
        with pytest.raises(AdapterError, match=f"the vision tower takes {lnv.side} x {lnv.side}"):
            lnv.encode([Sample(video=_frames(2, lnv.side, lnv.side), question="q", id="v")])
    finally:
        lnv.processor.frame_processor = own


def test_the_video_example_runs_on_the_family(tmp_path):
    """examples/video.yaml with only `model.source` changed: one partition map per kept frame (a token's frame is a
    frame here, 8 of them, 2 x 2 tokens each), and pruning by frame touches exactly the tokens the selections name."""
    import pandas as pd

    from embedlens.plan import load_plan, run_all

    example = Path(__file__).resolve().parents[2] / "examples" / "video.yaml"
    plan = tmp_path / "video.yaml"
    plan.write_text(example.read_text().replace("source: tiny:qwen2_vl", "source: tiny:llava_next_video"))
    out = tmp_path / "run"
    run_all(load_plan(plan), out)
    report = (out / "report.html").read_text()
    for f in range(8):
        assert f"token_partition_map_frame{f}.png" in report and (out / "figures" / f"token_partition_map_frame{f}.png").is_file()
    tokens = pd.read_parquet(out / "token_partition.tokens.parquet")
    assert (tokens.groupby("sample_id").apply(lambda t: sorted(set(zip(t.frame, t.row, t.col))), include_groups=False)
            .map(lambda v: v == [(f, r, c) for f in range(8) for r in range(2) for c in range(2)])).all()
    touched = pd.read_parquet(out / "touched_tokens.parquet")
    assert touched.sample_id.nunique() == tokens.sample_id.nunique()
    for sid, t in touched.groupby("sample_id"):
        assert sorted(zip(*(t[t.condition == "prune_frame0"][k] for k in ("frame", "row", "col")))) == [(0, r, c) for r in range(2) for c in range(2)]
        ctrl = t[t.condition == "prune_frame0_random"]
        assert len(ctrl) == 4 and (ctrl.frame > 0).all()
        assert sorted(zip(*(t[t.condition == "prune_top1"][k] for k in ("frame", "row")))) == [(1, 0)] * 2
        ctrl = t[t.condition == "prune_top1_random"]  # per_frame: 2 tokens of frame 1, outside the target row
        assert len(ctrl) == 2 and set(ctrl.frame) == {1} and (ctrl.row > 0).all()
        dead = tokens[(tokens.sample_id == sid) & (tokens.group == "dead")]
        ctrl = t[t.condition == "prune_dead_random"]
        assert ctrl.frame.value_counts().sort_index().to_dict() == dead.frame.value_counts().sort_index().to_dict()


def test_tower_ranked_reductions_refuse_pooled_video_tokens():
    """FasterVLM / VisionZip read one tower token per visual token: on a video batch (tokens pool s x s patches) they
    are refused by name, while the same model's image batches run them."""
    from embedlens.errors import InterventionError
    from embedlens.reduction.attention_ranked import FasterVLM

    adapter = load_model("tiny:llava_next_video")
    video = adapter.encode([Sample(video=_frames(2, 32, 32), question="what?", id="v")])
    assert adapter.patch_indices(torch.zeros(1, dtype=torch.long), video.inputs).shape == (1, 4) and adapter.features_per_token(video.inputs)
    with pytest.raises(InterventionError, match=r"pools several of the tower's patches"):
        Engine(adapter).run(video, [FasterVLM(keep=2)])
    image = adapter.encode([Sample([shapes(32)], question="what?", id="i")])
    assert adapter.patch_indices(torch.zeros(1, dtype=torch.long), image.inputs).shape == (1, 1) and not adapter.features_per_token(image.inputs)
    kept = Engine(adapter).run(image, [FasterVLM(keep=2)])
    assert kept.logits().shape[0] == 1


def test_per_patch_flags_reach_the_video_token_that_pools_them(lnv):
    """A flag planted on one patch of one frame (`[tower rows, patches]`, as the ViT-norm rule gives) reaches exactly
    the video token whose pooled block holds that patch (`vision_to_tokens`), and a tower site's row of each token is
    the mean over its block (`visual_rows`)."""
    from embedlens.probes._util import visual_rows
    from embedlens.signals import vision_to_tokens

    batch = _batch(lnv, n_frames=(3, 2))
    vt = batch.roles.visual_tokens()
    n, s = lnv.side // int(lnv.config.vision_config.patch_size), int(lnv.config.spatial_pool_stride)
    for row, pr, pc in ((0, 0, 0), (2, n - 1, 1), (4, 1, n - 1)):
        flags = torch.zeros(5, n * n)
        flags[row, pr * n + pc] = 1.0
        got = vision_to_tokens(flags, vt, lnv, batch.inputs)
        want = (vt["feature_row"] == row) & (vt["row"] == pr // s) & (vt["col"] == pc // s)
        assert torch.equal(got.bool(), want) and int(want.sum()) == 1
    site = Site("vision.layers", 0)
    layer = collect(lnv, batch, [site])[site]  # [frames, 1 + n * n, d]
    grid = layer[:, 1:].reshape(5, n // s, s, n // s, s, -1).mean((2, 4)).reshape(5, (n // s) ** 2, -1)  # blocks, by hand
    torch.testing.assert_close(visual_rows(lnv, site, layer, vt, batch.inputs), grid[vt["feature_row"], vt["feature_col"]], **TOL)

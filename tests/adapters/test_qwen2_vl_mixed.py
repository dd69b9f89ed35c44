"""Qwen2-VL / Qwen2.5-VL batches that mix image samples and video samples: the inputs and role map of each
sample are those it has alone, the vision sites are the tower's two runs (images, then videos) as HF runs them,
and the LLM sites, logits and generation equal HF's, on embedlens's tiny models and HF's tester configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens.adapters import load_model, wrap_model
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.sites import Site
from embedlens.tracing import collect
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS

TOL = dict(atol=1e-5, rtol=1e-4)


def _pictures(n: int, side: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)) for _ in range(n)]


MODELS = ("tiny:qwen2_vl", "tiny:qwen2_5_vl", "tester:qwen2_vl", "tester:qwen2_5_vl", "tiny:qwen3_vl", "tester:qwen3_vl",
          "tiny:qwen3_vl_moe", "tester:qwen3_vl_moe", "tiny:qwen3_5", "tester:qwen3_5")


@pytest.fixture(scope="module", params=MODELS)
def qwen(request):
    kind, family = request.param.split(":")
    adapter = load_model(f"tiny:{family}") if kind == "tiny" else wrap_model(*BLOCK_TESTER_CONFIGS[family].build(0))
    ip = adapter.processor.image_processor
    factor = int(ip.patch_size) * int(ip.merge_size)
    adapter.side = min(4 * int(ip.patch_size), int(int(ip.size["longest_edge"]) ** 0.5) // factor * factor)
    return adapter


def _samples(qwen) -> list[Sample]:
    """An image, a video of 4 frames, two images, a video of 3 frames: images and videos interleaved."""
    s = qwen.side
    return [Sample(_pictures(1, s, 0), question="what is it?", id="i0"),
            Sample(video=_pictures(4, s, 1), question="what moves?", id="v0"),
            Sample(_pictures(2, s, 2), question="which differs?", id="i1"),
            Sample(video=_pictures(3, s, 3), question="is it red?", id="v1")]


@pytest.fixture(scope="module")
def mixed(qwen):
    return qwen.encode(_samples(qwen), padding_side="left")


def test_each_sample_is_encoded_as_it_is_alone(qwen, mixed):
    """Ids, modality types and role map (all but feature_col, which counts over the batch) of every sample equal
    its encoding alone (images through HF's processor, a video through the video path); the pixels are the image
    batch's and the video batch's."""
    samples = _samples(qwen)
    r = mixed.roles
    valid = mixed.inputs["attention_mask"].bool()
    for b, s in enumerate(samples):
        alone = qwen.encode([s])
        ra = alone.roles
        assert torch.equal(mixed.input_ids[b][valid[b]], alone.input_ids[0])
        assert torch.equal(mixed.inputs["mm_token_type_ids"][b][valid[b]], alone.inputs["mm_token_type_ids"][0])
        for field in ("kind", "image", "tile", "row", "col", "frame"):
            assert torch.equal(getattr(r, field)[b][valid[b]], getattr(ra, field)[0]), (s.id, field)
    images = qwen.encode([s for s in samples if s.video is None])
    videos = qwen.encode([s for s in samples if s.video is not None])
    for key, ref in (("pixel_values", images), ("image_grid_thw", images), ("pixel_values_videos", videos), ("video_grid_thw", videos)):
        assert torch.equal(mixed.inputs[key], ref.inputs[key]), key
    # feature_col: the tower's order, images first then videos (HF scatters each run's rows into its own tokens)
    acts = collect(qwen, mixed, ["projector", "llm.embed"])
    vt = r.visual_tokens()
    torch.testing.assert_close(acts[Site("llm.embed")][vt["sample"], vt["position"]], acts[Site("projector")][0, vt["feature_col"]], atol=0, rtol=0)
    n_img = int(r.visual[[0, 2]].sum())
    assert sorted(vt["feature_col"][(vt["sample"] == 0) | (vt["sample"] == 2)].tolist()) == list(range(n_img))


def test_one_patch_reaches_exactly_its_token(qwen, mixed):
    """Invert one patch of a video frame, or of the second image of sample i1: exactly one row of the joined
    `vision.embed` changes, inside the block of the token the role map puts there."""
    p, m = int(qwen.processor.image_processor.patch_size), qwen.merge_size
    base = collect(qwen, mixed, ["vision.embed"])[Site("vision.embed")][0]
    vt = mixed.roles.visual_tokens()
    n = qwen.side // p
    for sample, idx, image, frame, pr, pc in ((1, 2, 0, 1, n - 1, 1), (2, 1, 1, -1, 1, n - 1), (3, 2, 0, 1, 0, 0)):
        samples = _samples(qwen)
        s = samples[sample]
        pics = list(s.video.frames) if s.video is not None else list(s.images)
        arr = np.asarray(pics[idx]).copy()
        arr[pr * p:(pr + 1) * p, pc * p:(pc + 1) * p] = 255 - arr[pr * p:(pr + 1) * p, pc * p:(pc + 1) * p]
        pics[idx] = Image.fromarray(arr)
        samples[sample] = Sample(video=pics, question=s.question, id=s.id) if s.video is not None else Sample(pics, question=s.question, id=s.id)
        got = collect(qwen, qwen.encode(samples, padding_side="left"), ["vision.embed"])[Site("vision.embed")][0]
        rows = (got - base).abs().amax(-1).gt(1e-6).nonzero().flatten()
        assert len(rows) == 1, (sample, rows)
        token = (vt["sample"] == sample) & (vt["image"] == image) & (vt["frame"] == frame) & (vt["row"] == pr // m) & (vt["col"] == pc // m)
        assert int(token.sum()) == 1
        assert int(rows[0]) in qwen.patch_indices(vt["feature_col"][token])[0].tolist()
        assert not (qwen.patch_indices(vt["feature_col"][~token]) == rows[0]).any()


def test_sites_logits_and_generation_equal_hf(qwen, mixed):
    n = qwen.n_llm_layers
    acts = collect(qwen, mixed, [f"llm.layers[{i}]" for i in range(n)] + ["llm.unembed"]
                   + [f"vision.layers[{i}]" for i in range(qwen.n_vision_layers)] + ["projector"])
    # HF's own forward, every call of the tower's blocks and merger recorded by hooks (images' run, then videos')
    calls: dict[str, list[torch.Tensor]] = {}
    vis = qwen.model.model.visual
    hooks = [mod.register_forward_hook(lambda _m, _a, out, name=name: calls.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out))
             for name, mod in [*((f"vision.layers[{i}]", blk) for i, blk in enumerate(vis.blocks)), ("projector", vis.merger)]]
    try:
        with torch.no_grad():
            out = qwen.model(**qwen.model_inputs(mixed), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    valid = mixed.inputs["attention_mask"].bool()
    for i in range(n - 1):  # the last layer's output is normed in HF's hidden_states
        torch.testing.assert_close(acts[Site("llm.layers", i)][valid], out.hidden_states[i + 1][valid], **TOL)
    torch.testing.assert_close(acts[Site("llm.unembed")][valid], out.logits[valid], **TOL)
    for name, seen in calls.items():
        assert len(seen) == 2, name  # the tower ran twice
        torch.testing.assert_close(acts[qwen.resolve(name)],
                                   torch.cat([v if v.dim() == 3 else v[None] for v in seen], dim=1), **TOL)
    eng = Engine(qwen).run(mixed)
    torch.testing.assert_close(eng.logits()[valid], out.logits[valid], **TOL)
    ours = Engine(qwen).run(mixed, cache=True).generate(3)
    with torch.no_grad():
        hf = qwen.model.generate(**qwen.model_inputs(mixed), max_new_tokens=3, do_sample=False)[:, mixed.input_ids.shape[1]:]
    assert torch.equal(ours, hf)


def test_tower_images_and_display_pixels_follow_the_samples(qwen, mixed):
    """Per-image tower statistics number the images and videos in the samples' order; each one's displayed pixels
    are those it has alone."""
    from embedlens.probes._util import batch_image

    n = qwen._tokens_per_image(mixed.inputs) * qwen.merge_size**2  # patches per grid, tower order: i0, i1a, i1b, v0, v1
    assert torch.equal(qwen.tower_images(mixed.inputs)[0], torch.repeat_interleave(torch.tensor([0, 2, 3, 1, 4]), n))
    for b, s in enumerate(_samples(qwen)):
        alone = qwen.encode([s]).inputs
        for img in range(len(s.images) or 1):
            got = qwen.display_pixels(mixed.inputs, batch_image(mixed, b, img), 0, frame=1 if s.video is not None else 0)
            want = qwen.display_pixels(alone, img, 0, frame=1 if s.video is not None else 0)
            assert torch.equal(got, want), (s.id, img)

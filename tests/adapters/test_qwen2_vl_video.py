"""Qwen2-VL / Qwen2.5-VL video: the patch layout against HF's video patchify written out, each visual token on
its true temporal patch and patch (one frame's patch perturbed), sites equal to HF's own forward, and the
engine's logits and generation equal to HF's, on embedlens's tiny models and HF's tester configurations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens.adapters import Qwen2_5_VLAdapter, Qwen2VLAdapter, load_model, wrap_model
from embedlens.adapters.capabilities import Capability
from embedlens.adapters.qwen2_vl_video import frames_to_patches
from embedlens.data import Sample
from embedlens.errors import InputError
from embedlens.interventions import Engine
from embedlens.sites import Site
from embedlens.testing.images import shapes
from embedlens.tracing import collect
from embedlens.video import Video
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS

TOL = dict(atol=1e-5, rtol=1e-4)
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def _frames(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module", params=[f"{kind}:{f}" for kind in ("tiny", "tester") for f in FAMILIES])
def qwen(request):
    kind, family = request.param.split(":")
    if kind == "tiny":
        adapter = load_model(f"tiny:{family}")
    else:
        adapter = wrap_model(*BLOCK_TESTER_CONFIGS[family].build(0))
    assert type(adapter) is {"qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen2_5_VLAdapter}[family]
    assert adapter.has(Capability.VIDEO)
    ip = adapter.processor.image_processor
    # frames the processor keeps as they are (sides a multiple of patch x merge, within its pixel bounds): at most
    # 4 x 4 patches (HF's Qwen2.5-VL tester keeps 42 x 42 px: 3 x 3 patches of 14 px, no merge)
    factor = int(ip.patch_size) * int(ip.merge_size)
    adapter.side = min(4 * int(ip.patch_size), int(int(ip.size["longest_edge"]) ** 0.5) // factor * factor)
    return adapter


def _batch(qwen, n_frames=(4, 3), padding_side="left"):
    samples = [Sample(video=_frames(n, qwen.side, seed=i), question=q, id=f"v{i}")
               for i, (n, q) in enumerate(zip(n_frames, ["count the shapes", "what?", "is it red?"]))]
    return qwen.encode(samples, padding_side=padding_side)


def test_patch_rows_are_hfs_video_layout(qwen):
    """HF's video patchify (video_processing_qwen2_vl.patchify) written out on the normalised frames: pad to an
    even count with the last frame, view as (t, 2, C, h/m, m, p, w/m, m, p), order (t, h/m, w/m, m, m, C, 2, p, p)."""
    ip = qwen.processor.image_processor
    frames = _frames(3, qwen.side)
    rows, grid = frames_to_patches(ip, Video(frames))
    mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
    x = torch.stack([(torch.tensor(np.asarray(f), dtype=torch.float32).permute(2, 0, 1) / 255 - mean) / std for f in frames])
    x = torch.cat([x, x[-1:]])  # 3 frames -> 4: the last repeated
    p, m, s = int(ip.patch_size), int(ip.merge_size), qwen.side
    want = x.view(2, 2, 3, s // p // m, m, p, s // p // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(2 * (s // p) ** 2, -1)
    assert grid == [2, s // p, s // p]
    torch.testing.assert_close(rows, want, atol=1e-5, rtol=0)


def test_role_map_puts_each_token_on_its_temporal_patch_and_block(qwen):
    batch = _batch(qwen)
    roles, ids = batch.roles, batch.input_ids
    assert (ids[roles.visual] == qwen.config.video_token_id).all() and not (ids == qwen.config.image_token_id).any()
    assert torch.equal(roles.visual, batch.inputs["mm_token_type_ids"] == 2)
    g = qwen.side // int(qwen.processor.image_processor.patch_size) // qwen.merge_size  # tokens per side
    for b, n_frames in enumerate((4, 3)):
        vis = roles.visual[b]
        t = (n_frames + 1) // 2  # temporal patches: frames in pairs, an odd count padded
        k = torch.arange(t * g * g)
        assert torch.equal(roles.frame[b][vis], k // (g * g))
        assert torch.equal(roles.row[b][vis], (k % (g * g)) // g) and torch.equal(roles.col[b][vis], k % g)
        assert (roles.frame[b][~vis] == -1).all() and (roles.image[b][vis] == 0).all()
    # the question is where it was asked
    tok = qwen.tokenizer
    assert tok.decode(ids[0][roles.question[0]]).replace(" ", "") == "counttheshapes"


def test_one_frames_patch_reaches_exactly_its_token(qwen):
    """Invert one patch of one frame: exactly one row of the tower's patch embedding (`vision.embed`) changes,
    and it is in the 2 x 2 block of the token the role map puts at (frame // 2, row // 2, col // 2)."""
    p = int(qwen.processor.image_processor.patch_size)
    frames = _frames(4, qwen.side, seed=3)
    enc = lambda fr: qwen.encode([Sample(video=fr, question="what moves?", id="v")])  # noqa: E731
    ref = enc(frames)
    base = collect(qwen, ref, ["vision.embed"])[Site("vision.embed")][0]
    vt = ref.roles.visual_tokens()
    n = qwen.side // p  # patches per side
    for f, pr, pc in ((0, 0, 0), (1, 2 % n, 3 % n), (2, n - 1, 1), (3, 1, n - 1)):
        arr = np.asarray(frames[f]).copy()
        arr[pr * p:(pr + 1) * p, pc * p:(pc + 1) * p] = 255 - arr[pr * p:(pr + 1) * p, pc * p:(pc + 1) * p]
        changed_frames = frames[:f] + [Image.fromarray(arr)] + frames[f + 1:]
        got = collect(qwen, enc(changed_frames), ["vision.embed"])[Site("vision.embed")][0]
        rows = (got - base).abs().amax(-1).gt(1e-6).nonzero().flatten()
        assert len(rows) == 1, (f, pr, pc, rows)
        token = (vt["frame"] == f // 2) & (vt["row"] == pr // qwen.merge_size) & (vt["col"] == pc // qwen.merge_size)
        assert int(token.sum()) == 1
        block = qwen.patch_indices(vt["feature_col"][token])[0]
        assert int(rows[0]) in block.tolist(), (f, pr, pc)
        # and no other token's block holds it
        others = qwen.patch_indices(vt["feature_col"][~token])
        assert not (others == rows[0]).any()


def test_sequence_positions_receive_their_tokens_features(qwen):
    """`llm.embed` at each visual position is the projector's row the role map names (HF scatters in order)."""
    batch = _batch(qwen)
    acts = collect(qwen, batch, ["projector", "llm.embed"])
    vt = batch.roles.visual_tokens()
    torch.testing.assert_close(acts[Site("llm.embed")][vt["sample"], vt["position"]], acts[Site("projector")][0, vt["feature_col"]], atol=0, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sites_equal_hf_hidden_states(qwen, padding_side):
    batch = _batch(qwen, padding_side=padding_side)
    n = qwen.n_llm_layers
    acts = collect(qwen, batch, [f"llm.layers[{i}]" for i in range(n)] + ["llm.unembed"])
    with torch.no_grad():
        out = qwen.model(**qwen.model_inputs(batch), output_hidden_states=True)
    valid = batch.inputs["attention_mask"].bool()
    for i in range(n - 1):  # the last layer's output is normed in HF's hidden_states
        torch.testing.assert_close(acts[Site("llm.layers", i)][valid], out.hidden_states[i + 1][valid], **TOL)
    torch.testing.assert_close(acts[Site("llm.unembed")][valid], out.logits[valid], **TOL)
    # the tower's layers on the video sequence
    vis = qwen.model.model.visual
    with torch.no_grad():
        tower = vis(batch.inputs["pixel_values_videos"], grid_thw=batch.inputs["video_grid_thw"], output_hidden_states=True)
    layers = collect(qwen, batch, [f"vision.layers[{i}]" for i in range(qwen.n_vision_layers)])
    for i in range(qwen.n_vision_layers):
        h = tower.hidden_states[i + 1]
        torch.testing.assert_close(layers[Site("vision.layers", i)], h if h.dim() == 3 else h[None], **TOL)


def test_engine_logits_and_generation_equal_hf(qwen):
    batch = _batch(qwen, padding_side="left")
    with torch.no_grad():
        ref = qwen.model(**qwen.model_inputs(batch)).logits
    out = Engine(qwen).run(batch)
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits()[valid], ref[valid], **TOL)
    ours = Engine(qwen).run(batch, cache=True).generate(3)
    with torch.no_grad():
        hf = qwen.model.generate(**qwen.model_inputs(batch), max_new_tokens=3, do_sample=False)[:, batch.input_ids.shape[1]:]
    assert torch.equal(ours, hf)


def test_pruning_one_temporal_patch_equals_cutting_it_out(qwen):
    """Pruning `visual and frame == 1` gives the logits of a forward where those tokens never were: the engine's
    prune vs HF's model on the embeddings with those positions cut out (positions kept as they were)."""
    from embedlens.interventions.prune import Prune

    batch = _batch(qwen, n_frames=(4,), padding_side="left")
    engine = Engine(qwen)
    pruned = engine.run(batch, [Prune(tokens="visual and frame == 1")])
    keep = ~((batch.roles.frame == 1) & batch.roles.visual)[0]
    ctx = engine.context(batch)
    with torch.no_grad():
        ref = qwen.model.model.language_model(inputs_embeds=ctx.embeds[:, keep], position_ids=ctx.positions[:, :, keep])
        logits = qwen.model.lm_head(ref.last_hidden_state)
    torch.testing.assert_close(pruned.last_logits(), logits[:, -1], **TOL)


def test_video_errors(qwen):
    with pytest.raises(InputError, match="one video placeholder"):
        qwen.encode([Sample(video=_frames(2, qwen.side), prompt="no placeholder here", id="v")])


@pytest.mark.parametrize("kind", ["image", "video"])
def test_token_maps_show_each_samples_own_pixels(kind):
    """The maps of a batch's second sample show its own image / first frame (the packed tower's display takes the
    batch-wide image index), equal to that sample's pixels encoded alone."""
    from embedlens.probes._util import FirstImage

    qwen = load_model("tiny:qwen2_vl")
    make = (lambda i: Sample([_frames(1, 32, seed=i)[0]], question="what?", id=f"s{i}")) if kind == "image" else \
        (lambda i: Sample(video=_frames(2, 32, seed=i), question="what?", id=f"s{i}"))
    samples = [make(0), make(1)]
    batch = qwen.encode(samples)
    maps = FirstImage(n=2)
    maps.offer(qwen, batch, batch.roles.visual_tokens())
    for i, entry in enumerate(maps.images):
        alone = FirstImage(n=1)
        one = qwen.encode([samples[i]])
        alone.offer(qwen, one, one.roles.visual_tokens())
        torch.testing.assert_close(entry["pixels"], alone.data["pixels"], atol=0, rtol=0)
    assert not torch.equal(maps.images[0]["pixels"], maps.images[1]["pixels"])
    if kind == "video":  # the first frame, and frame 0's tokens only
        assert len(maps.images[0]["row"]) == 16

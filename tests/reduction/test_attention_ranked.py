"""FasterVLM, VisionZip and VisPruner choose the tokens their authors' code chooses.

The authors' selection code (tests/reduction/reference/, copied with its
licence) runs on the same tensors: planted ones with distinct scores (so
``topk`` / ``argsort`` have one right answer and the tie rule never decides),
several images per sample (the reference runs once per image), and the tiny
LLaVA's own tower, whose attentions Hugging Face computes eagerly.
"""

from __future__ import annotations

import pytest
import torch

from embedlens.adapters.base import resolve_path
from embedlens.interventions import Engine
from embedlens.reduction.attention_ranked import FasterVLM, VisionZip, VisPruner, visionzip_merge, visionzip_select, vispruner_select
from embedlens.reduction.budget import Budget
from embedlens.reduction.vision import feature_layer, read_tower
from embedlens.testing import tiny_batch
from tests.reduction.reference.fastervlm import fastervlm
from tests.reduction.reference.visionzip import visionzip
from tests.reduction.reference.vispruner import vispruner

HEADS, HD, C = 3, 5, 7


def planted_tower(n_images: int, n_patches: int, seed: int):
    """Per image: attentions [1, H, 1+N, 1+N] (row-softmaxed), hidden [1, 1+N, C], metric [1, 1+N, HD]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_images):
        att = torch.randn(1, HEADS, n_patches + 1, n_patches + 1, generator=gen, dtype=torch.float64).softmax(-1)
        out.append((att, torch.randn(1, n_patches + 1, C, generator=gen, dtype=torch.float64),
                    torch.randn(1, n_patches + 1, HD, generator=gen, dtype=torch.float64)))
    return out


def layout(images_per_sample: list[int], n_patches: int, lead: list[int]):
    """A `[batch, seq]` layout: `lead[b]` text tokens (padding-like offsets), then each image's patches, then 2 text."""
    seq = max(lead[b] + k * (n_patches + 1) + 2 for b, k in enumerate(images_per_sample))
    image = torch.full((len(lead), seq), -1)
    where = []  # (b, image index within sample, first position)
    for b, k in enumerate(images_per_sample):
        pos = lead[b]
        for i in range(k):
            image[b, pos : pos + n_patches] = i
            where.append((b, i, pos))
            pos += n_patches + 1  # one text token between images
    return image, where


def spread(tower, where, seq, batch):
    """The planted per-image tensors on the sequence: [CLS] attention (head mean), features, head-mean keys."""
    cls = torch.zeros(batch, seq, dtype=torch.float64)
    feats = torch.zeros(batch, seq, C, dtype=torch.float64)
    keys = torch.zeros(batch, seq, HD, dtype=torch.float64)
    for (att, hidden, metric), (b, _, pos) in zip(tower, where):
        n = att.shape[-1] - 1
        cls[b, pos : pos + n] = att[0, :, 0, 1:].mean(0)
        feats[b, pos : pos + n] = hidden[0, 1:]
        keys[b, pos : pos + n] = metric[0, 1:]
    return cls, feats, keys


N = 40
IMAGES, LEAD = [2, 1], [3, 0]


@pytest.mark.parametrize("keep", [1, 5, 12, 0.3, 1.0])
def test_fastervlm_keeps_the_reference_topk_per_image(keep):
    tower = planted_tower(3, N, seed=1)
    image, where = layout(IMAGES, N, LEAD)
    cls, _, _ = spread(tower, where, image.shape[1], 2)
    budget = Budget.parse(keep)
    got = budget.keep_mask(cls, image >= 0, image)
    k = int(budget.counts(torch.tensor(N)))
    for (att, _, _), (b, _, pos) in zip(tower, where):
        assert torch.equal(got[b, pos : pos + N], fastervlm(att, k)[0])
    assert int(got.sum()) == 3 * k


@pytest.mark.parametrize("keep,contextual,dominant,n_ctx", [(8, 0.25, 6, 2), (16, 0.15625, 14, 2), (0.2, 0.5, 4, 4)])
def test_visionzip_keeps_and_merges_as_the_reference(keep, contextual, dominant, n_ctx):
    tower = planted_tower(3, N, seed=2)
    image, where = layout(IMAGES, N, LEAD)
    cls, feats, keys = spread(tower, where, image.shape[1], 2)
    kept, targets, into = visionzip_select(cls, keys, image >= 0, image, Budget.parse(keep), contextual)
    merged = visionzip_merge(feats, into, targets)
    for (att, hidden, metric), (b, _, pos) in zip(tower, where):
        saved, all_indices, target_places = visionzip(att, hidden, metric, dominant, n_ctx)
        want = torch.zeros(N, dtype=torch.bool)
        want[all_indices[0, 1:] - 1] = True  # dominant patches ([CLS], index 0, is not a visual token here)
        want[target_places - 1] = True
        assert torch.equal(kept[b, pos : pos + N], want)
        got_targets = targets[b, pos : pos + N].nonzero().flatten()
        assert torch.equal(got_targets, target_places - 1)
        # each contextual token's feature: the reference's `hidden_states_save` after the dominant ones, in order
        torch.testing.assert_close(merged[b, pos + got_targets], saved[0, dominant + 1 :], rtol=1e-12, atol=1e-12)
    assert int(kept.sum()) == 3 * (dominant + n_ctx)


# budgets the reference runs with: its rounds need an even remainder and at least `r` tokens in each half (LLaVA's
# 64/128/192 with ratio 0.5 always are); where they are not, it fails, and `vispruner_select` caps `r` at the half
@pytest.mark.parametrize("keep,ratio", [(16, 0.5), (20, 0.5), (24, 0.25), (16, 0.0), (8, 1.0)])
def test_vispruner_keeps_the_reference_selection(keep, ratio):
    tower = planted_tower(3, N, seed=3)
    image, where = layout(IMAGES, N, LEAD)
    cls, feats, _ = spread(tower, where, image.shape[1], 2)
    got = vispruner_select(cls, feats, image >= 0, image, Budget.parse(keep), ratio)
    for (att, hidden, _), (b, _, pos) in zip(tower, where):
        want = vispruner(hidden[:, 1:], att[:, :, 0, 1:], keep, ratio)[0]
        assert torch.equal(got[b, pos : pos + N], want)
    assert int(got.sum()) == 3 * keep


def test_vispruner_rounds_drop_the_planted_duplicate():
    """Eight orthogonal patches but one, a copy of another; attention rises with position. The two important tokens
    are the last two; the remainder (in attention order 5, 4, 3, 2, 1, 0) splits into A = 5, 3, 1 and B = 4, 2, 0,
    and the one round (R - d = 6 - 5) drops the A token with a copy in B: patch 3, the copy of patch 2."""
    feats = torch.eye(8)[None].clone()
    feats[0, 3] = feats[0, 2]
    cls = torch.linspace(0.1, 0.8, 8)[None]
    image = torch.zeros(1, 8, dtype=torch.long)
    got = vispruner_select(cls, feats, image >= 0, image, Budget.parse(7), 0.3)
    assert got[0].tolist() == [True, True, True, False, True, True, True, True]
    assert vispruner(feats, cls[:, None, :], 7, 0.3).tolist() == got.tolist()


# -- on the tiny model: the tower's own eager attentions, read by Hugging Face -------------------------------------

@pytest.fixture(scope="module", params=["llava-clip", "llava-siglip"])
def tiny(request):
    adapter, batch = tiny_batch(request.param, n=2, padding_side="left")
    tower = adapter.model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            hf = tower(batch.inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    finally:
        tower.set_attn_implementation("sdpa")
    return adapter, batch, hf


def _kept(adapter, batch, iv):
    eng = Engine(adapter)
    ctx = eng.context(batch)
    cand = ctx.roles.visual & ctx.valid
    iv.check(adapter)
    iv.setup(ctx)
    return ctx, cand & (ctx.exit > 0)


def test_read_tower_equals_the_eager_attention_of_the_feature_layer(tiny):
    adapter, batch, hf = tiny
    layer = feature_layer(adapter)
    att = hf.attentions[layer]  # [tiles, H, T, T]
    score = att[:, :, 0].mean(1) if adapter.n_cls_tokens else att.mean(1).mean(1)  # SigLIP: mean received
    vt = batch.roles.visual_tokens()
    read = read_tower(adapter, batch, batch.roles.visual, features=True)
    col = vt["feature_col"] + adapter.n_prefix_tokens
    torch.testing.assert_close(read.attention[vt["sample"], vt["position"]], score[vt["feature_row"], col], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(read.features[vt["sample"], vt["position"]], hf.hidden_states[layer + 1][vt["feature_row"], col])


def test_tiny_model_fastervlm_and_vispruner_equal_the_reference(tiny):
    adapter, batch, hf = tiny
    if not adapter.n_cls_tokens:
        pytest.skip("the references' [CLS] row needs a CLIP tower")
    layer = feature_layer(adapter)
    vt = batch.roles.visual_tokens()
    for iv, ref in [(FasterVLM(keep=5), lambda: fastervlm(hf.attentions[layer], 5)),
                    (VisPruner(keep=12), lambda: vispruner(hf.hidden_states[layer + 1][:, 1:], hf.attentions[layer][:, :, 0, 1:], 12, 0.5))]:
        _, kept = _kept(adapter, batch, iv)
        want = ref()  # [tiles, N]: one tile per sample here
        assert torch.equal(kept[vt["sample"], vt["position"]], want[vt["feature_row"], vt["feature_col"]]), type(iv).__name__


def test_tiny_model_visionzip_equals_the_reference_and_feeds_the_merged_tokens(tiny):
    adapter, batch, hf = tiny
    if not adapter.n_cls_tokens:
        pytest.skip("the reference's [CLS] row needs a CLIP tower")
    layer = feature_layer(adapter)
    tower_layer = resolve_path(adapter.model, adapter.paths.vision_layers)[layer]
    x = tower_layer.layer_norm1(hf.hidden_states[layer])
    n, t, _ = x.shape
    metric = tower_layer.self_attn.k_proj(x).view(n, t, -1, tower_layer.self_attn.head_dim).transpose(1, 2).mean(1)
    iv = VisionZip(keep=8, contextual=0.25)  # 6 dominant + 2 contextual
    ctx, kept = _kept(adapter, batch, iv)
    vt = batch.roles.visual_tokens()
    embeds = iv.edit_embeds(ctx, ctx.embeds)
    projector = adapter.model.model.multi_modal_projector
    for b in range(n):
        saved, all_indices, targets = visionzip(hf.attentions[layer][b : b + 1], hf.hidden_states[layer + 1][b : b + 1],
                                                metric[b : b + 1], 6, 2)
        want = torch.zeros(t - 1, dtype=torch.bool)
        want[all_indices[0, 1:] - 1] = True
        want[targets - 1] = True
        mine = vt["sample"] == b
        assert torch.equal(kept[b, vt["position"][mine]], want[vt["feature_col"][mine]])
        at = vt["position"][mine][torch.isin(vt["feature_col"][mine], targets - 1)]
        torch.testing.assert_close(embeds[b, at], projector(saved[0, 7:]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [FasterVLM, VisionZip, VisPruner])
def test_conforms_on_every_family_with_one_patch_per_token(cls):
    """Same logits with left and right padding, a state that checkpoints, a registration that validates: on every
    tiny family with one tower patch per visual token (anyres tiles included)."""
    from embedlens.testing.conformance import check_intervention

    check_intervention(cls, params={"keep": 0.5}, families=("llava-clip", "llava-siglip", "llava_next", "llava_onevision", "paligemma",
                                                                   "llava_next_video"))


def test_a_tower_that_merges_patches_is_refused_by_name():
    from embedlens.adapters import load_model
    from embedlens.errors import InterventionError

    with pytest.raises(InterventionError, match=r"visionzip ranks the tower's patches.*merges"):
        VisionZip().check(load_model("tiny:idefics3"))


def test_anyres_tiles_are_ranked_per_image_by_each_tile_own_cls_row():
    """LLaVA-NeXT: an image is several tower rows (tiles), each with its own [CLS]. FasterVLM ranks all of an image's
    tokens together by their own tile's [CLS] attention, which Hugging Face's eager attention gives here
    (the budget is per image, as the papers count LLaVA-NeXT's tokens)."""
    from embedlens.sites import Site
    from embedlens.tracing import collect

    adapter, batch = tiny_batch("llava_next", n=2, padding_side="left")
    layer = feature_layer(adapter)
    x_in = collect(adapter, batch, [Site("vision.layers", layer - 1)])[Site("vision.layers", layer - 1)]
    block = resolve_path(adapter.model, adapter.paths.vision_layers)[layer]
    tower = adapter.model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            weights = block.self_attn(block.layer_norm1(x_in))[1]  # [tiles, H, T, T]
    finally:
        tower.set_attn_implementation("sdpa")
    cls_row = weights[:, :, 0].mean(1)
    _, kept = _kept(adapter, batch, FasterVLM(keep=0.25))
    vt = batch.roles.visual_tokens()
    score = cls_row[vt["feature_row"], vt["feature_col"] + adapter.n_prefix_tokens]
    for b in range(2):
        mine = (vt["sample"] == b).nonzero().flatten()
        k = -(-len(mine) // 4)
        top = sorted(mine.tolist(), key=lambda i: (-float(score[i]), int(vt["position"][i])))[:k]
        want = set(vt["position"][top].tolist())
        assert set(kept[b].nonzero().flatten().tolist()) == want
        assert len({int(r) for r in vt["feature_row"][mine]}) > 1  # several tiles in this image


@pytest.mark.parametrize("cls", [FasterVLM, VisionZip, VisPruner])
def test_a_tower_they_cannot_read_is_refused_by_name_when_the_engine_runs_them(cls):
    """Qwen2-VL merges 2x2 patches per visual token: the engine's own run refuses it as the plan's check does,
    with the method's reason, not an AttributeError from inside the tower."""
    from embedlens.errors import InterventionError

    adapter, batch = tiny_batch("qwen2_vl", n=1)
    with pytest.raises(InterventionError, match=r"ranks the tower's patches, one per visual token; qwen2_vl merges \(2, 2\)"):
        Engine(adapter).run(batch, [cls(keep=2)])


def test_visionzip_checkpoints_its_parameters_not_the_last_batchs_merged_tokens():
    """A checkpoint after a batch holds no tensor (the merged tokens, `[batch, seq, d]`, are rebuilt by every
    batch) and loads back into a fresh instance."""
    import json

    from embedlens.state import decode_state, encode_state

    adapter, batch = tiny_batch("llava-clip", n=2)
    iv = VisionZip(keep=3)
    Engine(adapter).run(batch, [iv])
    assert iv._merged is not None  # the run did merge
    meta, tensors = encode_state(iv, "visionzip")
    assert tensors == {}
    fresh = VisionZip(keep=3)
    decode_state(fresh, json.loads(json.dumps(meta)), tensors, "visionzip")
    assert encode_state(fresh, "visionzip")[0] == meta

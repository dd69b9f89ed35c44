"""Gemma 3: the image span and pooled patch blocks against HF's own code, the bidirectional image blocks and the
sliding-window layers in the intervention engine, and the logits the multimodal model really produces.

The family-wide proofs (sites == HF hidden states, role map with left/right padding and several images, one
pixel patch -> one patch -> exactly the token of its pooled block, conformance, intervention equivalences) run
on ``tiny:gemma3`` through the parametrised suites, and on HF's ``Gemma3Vision2TextModelTester`` values in
``tests/adapters/test_hf_configs.py`` (``BLOCK_TESTER_CONFIGS["gemma3"]``, ``["gemma3-window"]``).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from conftest import get_adapter, hf_run
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.interventions.prune import Prune
from embedlens.roles import Role
from embedlens.sites import Site
from embedlens.testing.images import noise
from embedlens.tracing import collect


@pytest.fixture(scope="module")
def adapter():
    return get_adapter("gemma3")


def _samples():
    return [
        Sample([noise(40, 70, seed=1)], question="what is it?", answer="a red circle", id="a"),
        Sample([noise(32, 32, seed=2), noise(20, 50, seed=3)], question="count the shapes", answer="two", id="b"),
    ]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_image_span_markers_and_blocks(adapter, padding_side):
    """Each image is <start_of_image> + mm_tokens_per_image soft tokens + <end_of_image>, whatever its aspect ratio
    (no pan-and-scan): markers SPECIAL, soft tokens VISUAL in row-major order of the pooled grid, feature rows
    counting images over the batch; the engine's bidirectional blocks are HF's own block ids."""
    batch = adapter.encode(_samples(), padding_side=padding_side)
    roles, ids, cfg = batch.roles, batch.input_ids, adapter.config
    n = cfg.mm_tokens_per_image
    side = int(n**0.5)
    first = 0
    for b, s in enumerate(batch.samples):
        starts = (ids[b] == cfg.boi_token_id).nonzero().flatten()
        ends = (ids[b] == cfg.eoi_token_id).nonzero().flatten()
        assert len(starts) == len(ends) == len(s.images)
        assert (ends - starts == n + 1).all()
        assert (roles.kind[b][starts] == Role.SPECIAL).all() and (roles.kind[b][ends] == Role.SPECIAL).all()
        for i, at in enumerate(starts.tolist()):
            span = torch.arange(at + 1, at + 1 + n)
            assert (roles.kind[b][span] == Role.VISUAL).all() and (roles.image[b][span] == i).all()
            assert torch.equal(roles.row[b][span], torch.arange(n) // side)
            assert torch.equal(roles.col[b][span], torch.arange(n) % side)
            assert (roles.feature_row[b][span] == first + i).all()
        first += len(s.images)
        assert int(roles.visual[b].sum()) == n * len(s.images)
    want = get_block_sequence_ids_for_mask(batch.inputs["token_type_ids"])
    assert torch.equal(adapter.block_ids(batch.inputs), want)
    assert want.max() == 1  # two images in sample b: two blocks


def test_each_token_pools_the_block_the_map_names(adapter):
    """Run HF's own projector pooling on a one-hot code per patch: each token's nonzero inputs are exactly the
    patches `patch_indices` names for it (a k x k block, k = patches per side // sqrt(mm_tokens_per_image))."""
    proj = adapter.model.model.multi_modal_projector
    v = adapter.config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    eye = torch.eye(patches)[None]  # [1, patches, patches]: patch p carries code p
    pooled = proj.avg_pool(eye.transpose(1, 2).reshape(1, patches, proj.patches_per_image, proj.patches_per_image))
    pooled = pooled.flatten(2).transpose(1, 2)[0]  # [tokens, patches]
    assert adapter.patch_block == (2, 2) and pooled.shape[0] == 16
    named = adapter.patch_indices(torch.arange(pooled.shape[0]))
    for t in range(pooled.shape[0]):
        assert set(pooled[t].nonzero().flatten().tolist()) == set(named[t].tolist())


def test_bidirectional_image_attention_is_reproduced_and_matters(adapter):
    """Without token_type_ids HF attends causally inside images and the logits change; the engine, which builds the
    blocks itself, equals HF with them, also when half of an image is pruned (the rest stays one block)."""
    batch = adapter.encode(_samples(), padding_side="left")
    inputs = adapter.model_inputs(batch)
    pos = adapter.position_ids(batch.inputs)
    valid = ~batch.roles.padding
    with torch.no_grad():
        ref = adapter.model(**inputs, position_ids=pos).logits
        causal = adapter.model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}, position_ids=pos).logits
    assert (ref[valid] - causal[valid]).abs().max() > 1e-3
    eng = Engine(adapter)
    torch.testing.assert_close(eng.run(batch).logits()[valid], ref[valid], atol=1e-5, rtol=0)
    half = batch.roles.visual & (batch.roles.row < 2)
    out = eng.run(batch, [Prune(tokens="top")], groups={"top": half}.__getitem__)
    embeds = eng.embed(batch)
    for b in range(2):
        keep = valid[b] & ~half[b]
        torch.testing.assert_close(out.logits()[b][keep], hf_run(adapter, batch, b, keep, embeds).logits[0], atol=1e-5, rtol=0)


def test_sliding_windows_bite_and_are_counted_in_rows(adapter):
    """The tiny model's window (8) is shorter than its prompts, so a full-attention engine would be wrong there; the
    window counts the tokens a layer holds, not position ids: after removing tokens it reaches further back in
    position, exactly as HF's hand-cut run at the original position ids (the removal equivalence in
    test_equivalences), and decoding continues the count (generation test there)."""
    eng = Engine(adapter)
    assert eng.windows == [8, None, 8, None] and eng.layer_types[0] == "sliding_attention"
    batch = adapter.encode(_samples(), padding_side="right")
    assert int((~batch.roles.padding).sum(dim=1).min()) > 8
    valid = ~batch.roles.padding
    sliding = eng.run(batch).logits()[valid]
    eng.windows = [None] * 4  # every layer full: not what the model computes
    assert (eng.run(batch).logits()[valid] - sliding).abs().max() > 1e-3
    # the window measured in original position ids instead of rows would differ from the hand-cut run
    eng = Engine(adapter)
    pruned = batch.roles.visual & (batch.roles.col > 0)
    out = eng.run(batch, [Prune(tokens="p")], groups={"p": pruned}.__getitem__)
    embeds = eng.embed(batch)
    keep = valid[0] & ~pruned[0]
    pos = adapter.position_ids(batch.inputs)[0][keep]
    ref = hf_run(adapter, batch, 0, keep, embeds).logits[0]
    torch.testing.assert_close(out.logits()[0][keep], ref, atol=1e-5, rtol=0)
    gaps = pos[None, :] - pos[:, None]
    rows = torch.arange(len(pos))
    assert ((rows[None, :] - rows[:, None] > -8) != (gaps > -8)).any()  # the two rules pick different keys here


def test_logits_are_the_models_own_softcap_unused(adapter):
    """The config sets final_logit_softcapping, which Gemma3ForConditionalGeneration never applies: `llm.unembed`
    and the engine give `outputs.logits`, uncapped, even where a cap of 30 would bite (lm_head scaled up)."""
    assert adapter.config.text_config.final_logit_softcapping == 30.0 and adapter.final_logit_softcap is None
    from embedlens.adapters import load_model

    scaled = load_model("tiny:gemma3")
    with torch.no_grad():
        scaled.model.lm_head.weight.mul_(400.0)  # tied to embed_tokens: scales the inputs too, which is fine
    batch = scaled.encode(_samples())
    with torch.no_grad():
        ref = scaled.model(**scaled.model_inputs(batch), position_ids=scaled.position_ids(batch.inputs)).logits
    valid = ~batch.roles.padding
    assert (ref[valid].abs() > 30).any()
    got = collect(scaled, batch, ["llm.unembed"])[Site("llm.unembed")]
    torch.testing.assert_close(got, scaled.model(**scaled.model_inputs(batch)).logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(Engine(scaled).run(batch).logits()[valid], ref[valid], atol=1e-3, rtol=1e-5)


def test_llm_embed_holds_scaled_text_rows_and_raw_image_rows(adapter):
    """`llm.embed`: text rows are embedding rows times sqrt(hidden_size) (Gemma3TextScaledWordEmbedding), image rows
    the projector's output unscaled."""
    batch = adapter.encode(_samples())
    acts = collect(adapter, batch, ["llm.embed", "projector"])
    emb, proj = acts[Site("llm.embed")], acts[Site("projector")]
    roles, ids = batch.roles, batch.input_ids
    text = ~roles.image_span & ~roles.padding
    scale = adapter.config.text_config.hidden_size**0.5
    torch.testing.assert_close(emb[text], adapter.input_embeddings()[ids[text]] * scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb[roles.image_span], proj.reshape(-1, proj.shape[-1]), atol=1e-6, rtol=0)

"""Chunked attention (Llama 4's text model) in the intervention engine, against Hugging Face's own chunked mask.

The model is LLaVA's tester (CLIP tower, 16 image tokens) with a Llama 4 text model: three chunked layers of 8
tokens (rotary, one of them a mixture of experts) and a global NoPE layer (also MoE), so every prompt spans several
chunks. HF builds the chunked mask itself (``masking_utils.create_chunked_causal_mask``: chunks counted from each
sample's first non-padding token); the engine counts them by rank among the rows a layer holds, so a token pruned
by removal frees its place as in HF's run on the shortened sequence.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import CLIPVisionConfig, Llama4TextConfig, LlavaConfig, LlavaForConditionalGeneration

from embedlens.adapters import wrap_model
from embedlens.attention import Chunk, layer_windows
from embedlens.errors import AdapterError
from embedlens.interventions import Engine
from embedlens.tokenizer import build_tokenizer
from tests.interventions import test_equivalences as eq
from tests.support.hf_testers import LLAVA_TESTER, llava_builder

CHUNK = 8


def _llama4_text(tok, **over) -> Llama4TextConfig:
    values = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, intermediate_size_mlp=40, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
                  moe_layers=[1, 3], attention_chunk_size=CHUNK, no_rope_layers=[1, 1, 1, 0],
                  layer_types=["chunked_attention"] * 3 + ["full_attention"], pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return Llama4TextConfig(**{**values, **over})


@pytest.fixture(scope="module")
def adapter():
    _, processor = llava_builder()(0)
    tok = build_tokenizer()
    t = LLAVA_TESTER
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**t["vision"]), text_config=_llama4_text(tok),
                      image_token_id=tok.image_token_id, **t["top"])
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    a = wrap_model(model, processor)
    a.paths = dataclasses.replace(a.paths, mlp="feed_forward")  # Llama 4's decoder layers name their MLP so
    return a


@pytest.fixture(params=["left", "right"])
def setup(request, adapter):
    batch = adapter.encode(eq.prompt_samples(), padding_side=request.param)
    return adapter, batch, Engine(adapter)


def test_the_engine_reads_each_layers_chunk_from_the_config(adapter):
    eng = Engine(adapter)
    assert eng.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    assert eng.windows == [Chunk(CHUNK)] * 3 + [None]


def test_baseline_equals_hf_and_the_chunks_bite(setup):
    adapter, batch, eng = setup
    valid = ~batch.roles.padding
    assert int(valid.sum(dim=1).min()) > 2 * CHUNK  # every prompt spans three chunks or more
    eq.test_baseline_equals_hf(setup)
    with torch.no_grad():
        ref = adapter.model(**adapter.model_inputs(batch), position_ids=adapter.position_ids(batch.inputs)).logits
    full = Engine(adapter)
    full.windows = [None] * full.n_layers  # attention over the whole prompt: far from HF's chunked run
    assert (full.run(batch).logits()[valid] - ref[valid]).abs().max() > 1e-2


def test_prune_by_removal_equals_hf_on_the_shortened_sequence(setup):
    """Removal == HF on the cut sequence at the original positions (its chunks counted over the kept tokens);
    masking == HF with the pruned tokens at 0 in the 2-D mask (they keep their place in their chunk)."""
    assert eq.window_bites(setup[2], setup[1])
    eq.test_prune_remove_mask_and_hand_cut_agree(setup)


def test_decoding_after_pruning_counts_chunks_as_hf(setup):
    eq.test_masked_tokens_stay_hidden_from_decoded_tokens(setup)
    eq.test_generation_after_pruning_matches_hand_built(setup)


def test_a_chunked_layer_without_a_chunk_size_is_refused_by_name():
    from transformers.models.llama4.modeling_llama4 import Llama4TextAttention

    tok = build_tokenizer()
    cfg = _llama4_text(tok)
    attention = [Llama4TextAttention(cfg, i) for i in range(4)]
    cfg.attention_chunk_size = 0
    with pytest.raises(AdapterError, match=r"t: decoder layer 0 is a chunked_attention layer and config.attention_chunk_size is 0"):
        layer_windows(cfg, attention, "t")


def test_skip_sublayer_zeroes_a_mixture_of_experts_update_as_a_hook_on_hf(setup):
    """Llama 4's MoE feed-forward returns ``(update, router logits)``, its update flattened to ``[batch * rows, d]``;
    zeroing the visual tokens' update in the MoE layer 1 and the dense layer 2 equals hooks on HF's forward."""
    from embedlens.adapters.base import resolve_path
    from embedlens.interventions.layers import SkipSublayer

    from conftest import hf_run

    adapter, batch, eng = setup
    sel = batch.roles.visual & (batch.roles.col % 2 == 0)
    out = eng.run(batch, [SkipSublayer(tokens="visual and col % 2 == 0", sublayers=[1.5, 2.5])])
    layers = resolve_path(adapter.model, adapter.paths.llm_layers)
    with torch.no_grad():
        assert isinstance(layers[1].feed_forward(torch.zeros(1, 2, 32)), tuple)  # the MoE layer's output is a pair
    embeds = eng.embed(batch)
    for b in range(3):
        valid = ~batch.roles.padding[b]
        rows = sel[b][valid]
        hooks = [
            layers[1].feed_forward.register_forward_hook(lambda m, a, o: (o[0].masked_fill(rows[:, None], 0.0), *o[1:])),
            layers[2].feed_forward.register_forward_hook(lambda m, a, o: o.masked_fill(rows[None, :, None], 0.0)),
        ]
        try:
            ref = hf_run(adapter, batch, b, valid, embeds).logits[0]
        finally:
            for h in hooks:
                h.remove()
        torch.testing.assert_close(out.logits()[b][valid], ref, atol=eq.TOL, rtol=0)
    valid = ~batch.roles.padding
    assert (out.logits()[valid] - eng.run(batch).logits()[valid]).abs().max() > 1e-3  # the skipped updates mattered


@pytest.mark.parametrize("floor_scale", [8192, 4])
def test_attention_rows_equal_hfs_eager_attention_on_rope_chunked_and_nope_layers(adapter, floor_scale):
    """`attention_rows` rebuilds Llama 4's queries and keys (complex rotary frequencies on RoPE layers, none on the
    NoPE layer 3, whose queries HF scales by sequence index once `floor_scale` tokens pass: lowered to 4 here so
    the scaling bites) and equals HF's eager attention weights of one unpadded sample, under the chunked mask built
    here from HF's rule (key and query in the same chunk of 8)."""
    from embedlens.adapters.base import resolve_path
    from embedlens.attention import attention_rows

    batch = adapter.encode(eq.prompt_samples()[1:2])
    layers = resolve_path(adapter.model, adapter.paths.llm_layers)
    nope = layers[3].self_attn
    assert not nope.use_rope and nope.attn_temperature_tuning
    seen = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.__setitem__(i, (kw["hidden_states"], kw["position_embeddings"])), with_kwargs=True)
        for i, layer in enumerate(layers)]
    nope.floor_scale = floor_scale
    impl = adapter.model.config._attn_implementation
    adapter.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = adapter.model(**adapter.model_inputs(batch), output_attentions=True).attentions
            n = batch.inputs["input_ids"].shape[1]
            assert n > 2 * CHUNK
            i = torch.arange(n)
            causal = i[None, :] <= i[:, None]
            chunked = causal & (i[None, :] // CHUNK == i[:, None] // CHUNK)
            for layer, allowed in ((0, chunked), (1, chunked), (3, causal)):
                hidden, pe = seen[layer]
                assert pe.is_complex()
                got = attention_rows(layers[layer].self_attn, hidden, pe, i[None], allowed[None])
                torch.testing.assert_close(got, ref[layer], atol=1e-5, rtol=0)
            if floor_scale == 4:  # the scaling changed the NoPE layer's pattern: a reader without it would differ
                nope.attn_temperature_tuning = False
                plain = attention_rows(nope, *seen[3], i[None], causal[None])
                assert (plain - ref[3]).abs().max() > 1e-4
    finally:
        for h in hooks:
            h.remove()
        nope.floor_scale, nope.attn_temperature_tuning = 8192, True
        adapter.model.set_attn_implementation(impl)

"""Qwen3.5: a hybrid language model (Gated DeltaNet and full attention) under the engine, and the family proofs on
HF's own tester configuration.

The family-wide proofs (sites == HF hidden states, role map, one patch -> one token, planted codes, conformance,
intervention equivalences) run on ``tiny:qwen3_5`` through the parametrised suites; its layers 0 and 2 are Gated
DeltaNet layers, so every equivalence there passes through them (e.g. ``test_withdraw_equals_two_phase_run``:
image tokens leave before DeltaNet layer 2). Here: what is particular to linear attention, each against HF's own
forward or generation (which runs the DeltaNet scan itself).
"""

from __future__ import annotations

import pytest
import torch

from conftest import hf_masked_run, hf_run
from embedlens.adapters import Qwen3_5Adapter, load_model, wrap_model
from embedlens.adapters.base import resolve_path
from embedlens.data import Sample
from embedlens.errors import InterventionError, PlanError
from embedlens.interventions import Engine
from embedlens.interventions.layers import AttentionKnockout, InjectAtLayer, SkipSublayer, WithdrawAtLayer
from embedlens.interventions.prune import FastV, Prune
from embedlens.probes.attention_flow import AttentionFlow
from embedlens.testing.images import noise, shapes
from tests import test_roles
from tests.adapters import test_sites
from tests.interventions import test_equivalences
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS

TOL = 1e-5
TESTERS = [n for n, c in BLOCK_TESTER_CONFIGS.items() if c.family == "qwen3_5"]


@pytest.fixture(scope="module")
def qwen():
    return load_model("tiny:qwen3_5")


def samples() -> list[Sample]:
    return [Sample([shapes(64, seed=1)], question="what is it?", id="a"),
            Sample([noise(40, 70, seed=2)], question="what colour is the big square on the left?", id="b"),
            Sample([shapes(48, seed=3)], question="count", id="c")]


def test_the_tiny_model_interleaves_deltanet_and_attention(qwen):
    eng = Engine(qwen)
    layers = resolve_path(qwen.model, qwen.paths.llm_layers)
    assert eng.layer_types == ["linear_attention", "full_attention"] * 2 and eng.linear == [0, 2]
    assert [type(m).__name__ for m in eng.mixers] == ["Qwen3_5GatedDeltaNet", "Qwen3_5Attention"] * 2
    assert not hasattr(layers[0], "self_attn") and eng.mixers[0] is layers[0].linear_attn
    assert eng.windows == [None] * 4


def test_image_span_and_grids(qwen):
    """An image is <|vision_start|> + (h / 2)(w / 2) image tokens + <|vision_end|>, its grid from Qwen's resize
    rule (sides rounded to 8 px; above 32 x 32 px scaled by sqrt(h w / 32^2) and floored to 8 px), by hand:
    64 -> 32 x 32 px; 40 x 70 -> beta = sqrt(2800 / 1024), 40 / beta = 24.2 -> 24, 70 / beta = 42.3 -> 40 px;
    48 -> 32 px; a token covers 8 x 8 px."""
    batch = qwen.encode(samples())
    assert qwen.image_grids(batch.inputs) == [(4, 4), (3, 5), (4, 4)]
    for b, n in enumerate((16, 15, 16)):
        ids = batch.input_ids[b].tolist()
        start = ids.index(qwen.config.vision_start_token_id)
        assert ids[start + 1 : start + 1 + n] == [qwen.image_token_id] * n
        assert ids[start + 1 + n] == qwen.config.vision_end_token_id


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_never_leaks_into_the_recurrent_state(qwen, padding_side):
    """A batch (either padding side) equals each sample run alone through HF: padding rows are zeroed before the
    DeltaNet scan, and the engine's packed rows put them after every sample's tokens."""
    batch = qwen.encode(samples(), padding_side=padding_side)
    out = Engine(qwen).run(batch)
    for b, s in enumerate(samples()):
        alone = qwen.encode([s])
        with torch.no_grad():
            ref = qwen.model(**qwen.model_inputs(alone)).logits[0]
        torch.testing.assert_close(out.logits()[b][~batch.roles.padding[b]], ref, atol=TOL, rtol=0)


def test_prune_across_deltanet_layers_equals_hf_on_the_shortened_sequence(qwen):
    """Every other visual token removed: each layer's scan runs over the kept tokens only, as HF run on the cut
    sequence with the original (t, h, w) positions; by mask the tokens keep their scan step (HF with a 0 in the 2-D
    mask), which differs."""
    batch = qwen.encode(samples(), padding_side="left")
    eng = Engine(qwen)
    dead = batch.roles.visual & (torch.arange(batch.input_ids.shape[1]) % 2 == 0)
    groups = {"dead": dead}.__getitem__
    removed = eng.run(batch, [Prune(tokens="dead")], groups=groups)
    masked = eng.run(batch, [Prune(tokens="dead", mode="mask")], groups=groups)
    embeds = eng.embed(batch)
    keep = ~dead & ~batch.roles.padding
    for b in range(3):
        torch.testing.assert_close(removed.logits()[b][keep[b]], hf_run(qwen, batch, b, keep[b], embeds).logits[0], atol=TOL, rtol=0)
        ref = hf_masked_run(qwen, batch, b, dead[b], embeds).logits[0]
        torch.testing.assert_close(masked.logits()[b][keep[b]], ref[keep[b][~batch.roles.padding[b]]], atol=TOL, rtol=0)
    last = batch.roles.last_index
    assert not torch.allclose(removed.last_logits(), masked.last_logits(), atol=1e-4)  # the scan step matters
    assert torch.equal(removed.counts["visual"][0], (batch.roles.image_span & ~dead).sum(1))
    assert last.shape == (3,)


def test_inject_at_a_deltanet_layer_equals_a_two_phase_hf_run(qwen):
    """Image tokens enter at layer 2: the DeltaNet scan there runs over text states from a text-only prefix run and
    the projector outputs, in the original order."""
    batch = qwen.encode(samples(), padding_side="left")
    eng = Engine(qwen)
    out = eng.run(batch, [InjectAtLayer(layer=2)])
    embeds = eng.embed(batch)
    for b in range(3):
        valid = ~batch.roles.padding[b]
        text = valid & ~batch.roles.image_span[b]
        merged = embeds[b][valid].clone()
        merged[text[valid]] = hf_run(qwen, batch, b, text, embeds, output_hidden_states=True).hidden_states[2][0]
        ref = test_equivalences.hf_run_from(qwen, batch, b, valid, embeds, 2, merged).logits[0]
        torch.testing.assert_close(out.logits()[b][valid], ref, atol=TOL, rtol=0)


def test_skip_sublayer_zeroes_the_deltanet_update(qwen):
    """``n`` on a DeltaNet layer is the mixer's update: zeroing it equals a hook on HF's ``linear_attn``."""
    batch = qwen.encode(samples(), padding_side="left")
    eng = Engine(qwen)
    sel = batch.roles.visual & (batch.roles.col % 2 == 0)
    out = eng.run(batch, [SkipSublayer(tokens="visual and col % 2 == 0", sublayers=[0, 2])])
    layers = resolve_path(qwen.model, qwen.paths.llm_layers)
    embeds = eng.embed(batch)
    for b in range(3):
        valid = ~batch.roles.padding[b]
        rows = sel[b][valid]
        hooks = [layers[i].linear_attn.register_forward_hook(lambda m, a, o: o.masked_fill(rows[None, :, None], 0.0))
                 for i in (0, 2)]
        try:
            ref = hf_run(qwen, batch, b, valid, embeds).logits[0]
        finally:
            for h in hooks:
                h.remove()
        torch.testing.assert_close(out.logits()[b][valid], ref, atol=TOL, rtol=0)
    assert not torch.allclose(out.last_logits(), eng.run(batch).last_logits(), atol=1e-4)


def test_engine_decodes_as_hf_generate(qwen):
    """Decoding re-runs each DeltaNet layer over its held rows: greedy generation equals HF's own (which carries
    the recurrent state in its cache) on a left-padded batch; after pruning, HF on the cut prompt."""
    batch = qwen.encode(samples(), padding_side="left")
    eng = Engine(qwen)
    with torch.no_grad():
        ref = qwen.model.generate(**qwen.model_inputs(batch), max_new_tokens=5, do_sample=False)[:, batch.input_ids.shape[1]:]
    assert torch.equal(eng.run(batch, cache=True).generate(5), ref)
    out = eng.run(batch, [Prune(tokens="visual and col % 2 == 0")], cache=True)
    scores = out.score([[5, 9, 12]] * 3)
    embeds = eng.embed(batch)
    emb = qwen.model.get_input_embeddings()
    keep = out.present
    for b in range(3):
        cont = emb(torch.tensor([5, 9, 12]))
        x = torch.cat([embeds[b][keep[b]], cont])
        pos = qwen.position_ids(batch.inputs)[:, b][:, keep[b]]
        pos = torch.cat([pos, (pos.max() + 1 + torch.arange(3)).expand(3, 3)], dim=1)
        with torch.no_grad():
            logits = qwen.model(inputs_embeds=x[None], position_ids=pos[:, None], attention_mask=torch.ones(1, len(x), dtype=torch.long)).logits[0]
        n = int(keep[b].sum())
        lp = logits[n - 1 : n + 2].log_softmax(-1).double()
        want = lp[0, 5] + lp[1, 9] + lp[2, 12]
        torch.testing.assert_close(scores[b], want, atol=1e-4, rtol=0)


def test_attention_readings_refuse_deltanet_layers_by_name(qwen):
    eng = Engine(qwen)
    batch = qwen.encode(samples()[:2])
    with pytest.raises(InterventionError, match=r"attention_knockout.layers: decoder layers 0, 2 are linear-attention "
                                                r"\(Gated DeltaNet\) layers.*Attention applies in layers 1, 3$"):
        eng.run(batch, [AttentionKnockout(source="last", target="visual", layers=["0-3"])])
    out = eng.run(batch, [AttentionKnockout(source="last", target="visual", layers=[1, 3])])  # where it applies
    assert torch.isfinite(out.last_logits()).all()
    with pytest.raises(InterventionError, match=r"FastV at K = 1 ranks by the attention of decoder layer 0, a "
                                                r"linear-attention .*K may be 2 \(after an attention layer\)"):
        FastV(layer=1).check(qwen)
    FastV(layer=2).check(qwen)
    with pytest.raises(PlanError, match=r"attention_flow.layers: decoder layer 2 is a linear-attention"):
        AttentionFlow(layers=[1, 2]).check(qwen)
    assert AttentionFlow()._layers(qwen) == [1, 3]  # by default the layers that attend
    # what reduction methods (SparseVLM, DART, PyramidDrop) and FastV ask of the engine: refused at the request
    ctx = eng.context(batch)
    with pytest.raises(InterventionError, match=r"an attention probe: decoder layer 2 is a linear-attention.*layers 1, 3$"):
        ctx.probe_attention(2, lambda seen: None)
    with pytest.raises(InterventionError, match=r"the last token's attention: decoder layer 0 is a linear-attention"):
        ctx.request_last_attention(0)
    ctx.probe_attention(3, lambda seen: None)
    assert 3 in ctx.attention_probes


def test_reduction_defaults_rank_at_attention_layers(qwen):
    """SparseVLM's and PyramidDrop's default layers move onto the attention layers on a hybrid model; a
    linear-attention layer given by name is refused."""
    from embedlens.reduction.pyramiddrop import PyramidDrop
    from embedlens.reduction.sparsevlm import SparseVLM

    batch = qwen.encode(samples())
    eng = Engine(qwen)
    # SparseVLM: [2, 6, 15] of 32 -> [0, 1, 2] of 4 (at most layer 2) -> attention layers 1, 1, 1;
    # PyramidDrop: [8, 16, 24] of 32 -> [1, 2, 3] of 4 -> 1, 3, 3
    for iv, want in ((SparseVLM(keep=0.5), [1]), (PyramidDrop(keep=0.5), [1, 3])):
        eng.run(batch, [iv])
        assert iv._layers == want
    with pytest.raises(InterventionError, match=r"decoder layer 2 is a linear-attention.*layers 1, 3$"):
        eng.run(batch, [SparseVLM(keep=0.5, layers=[2])])


def test_flops_count_no_query_key_pairs_in_deltanet_layers(qwen):
    from embedlens.metrics.compare import prefill_flops

    batch = qwen.encode(samples()[:2])
    out = Engine(qwen).run(batch)
    layers = resolve_path(qwen.model, qwen.paths.llm_layers)
    want = torch.zeros(2, dtype=torch.float64)
    for i, layer in enumerate(layers):
        weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        want += 2.0 * out.counts["rows"][i].double() * weights
        if i % 2:  # the full-attention layers
            want += 4.0 * out.counts["keys"][i].double() * qwen.config.text_config.num_attention_heads * 32
    torch.testing.assert_close(prefill_flops(out), want)


# -- HF's tester configuration ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=TESTERS)
def tester(request):
    adapter = wrap_model(*BLOCK_TESTER_CONFIGS[request.param].build(0))
    assert type(adapter) is Qwen3_5Adapter
    return adapter


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hf_tester_config_role_map(tester, padding_side):
    test_roles.test_visual_positions_hold_image_tokens(tester, padding_side)
    test_roles.test_text_spans_decode_to_what_was_asked(tester, padding_side)
    test_roles.test_role_kinds_partition_every_position(tester)


def test_hf_tester_config_patch_blocks_and_features(tester):
    test_roles.test_row_col_match_the_patch_embedding(tester)
    test_roles.test_sequence_positions_receive_the_named_features(tester)


def test_hf_tester_config_sites(tester):
    test_sites.test_llm_sites_equal_hf_hidden_states(tester, "left")
    test_sites.test_llm_sites_equal_hf_hidden_states(tester, "right")
    test_sites.test_vision_sites_equal_hf_hidden_states(tester)


def _tester_batch(tester, padding_side):
    side = int(tester.processor.image_processor.size["longest_edge"] ** 0.5)
    samples = [Sample([noise(side, side, seed=i)], question=q, id=f"s{i}")
               for i, q in enumerate(["what?", "count the shapes", "is it red?"])]
    return tester.encode(samples, padding_side=padding_side)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hf_tester_config_engine_baseline_and_prune(tester, padding_side):
    """Engine logits equal HF's at batch 3, either padding side; prune (by removal and by mask) equals HF on the
    shortened sequence with the original positions (resp. with the tokens at 0 in the 2-D mask)."""
    batch = _tester_batch(tester, padding_side)
    setup = (tester, batch, Engine(tester))
    test_equivalences.test_baseline_equals_hf(setup)
    test_equivalences.test_prune_remove_mask_and_hand_cut_agree(setup)
    if tester.n_llm_layers > 2:  # the released pattern: image tokens leave before DeltaNet layer 2
        test_equivalences.test_withdraw_equals_two_phase_run(setup)

"""`dart`: DART's kept tokens equal the authors' own selection function run on the same tensors.

The reference (`tests/reduction/reference/dart_reference.py`, copied under its Apache-2.0 licence from
ZichenWen1/DART's llava/model/language_model/modeling_llama_self.py:397-449) is run as is. It visits the pivots in
a Python set's iteration order; `dart` visits them in position order. The two are the same for the authors' 4 + 4
pivots at positions below 32 (CPython's table for a set of 8 small ints has 32 slots, a slot per value), which the
tiny model's prompts are: there the unmodified reference must agree exactly. For other pivot counts (a table of 8
slots, where e.g. {6, 14, 20, 25} iterates as 25, 20, 6, 14) the test runs the reference with its ``set`` iterating
in position order, the one documented difference.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from embedlens.errors import InterventionError
from embedlens.interventions import Engine
from embedlens.reduction.dart import DART, dart_keep
from tests.reduction.inllm_support import eager_outputs, kept_after, models, samples
from tests.reduction.reference.dart_reference import get_retained_image_token


def reference(keys, states, start: int, length: int, budget: int, pivot_image: int, pivot_text: int) -> set[int]:
    """The authors' function on one sample: `keys` `[1, heads, seq, hd]` (layer K-1, after rotary and repeat_kv),
    `states` `[1, seq, d]` (layer K-1's output through the final norm)."""
    cfg = SimpleNamespace(text_length=None, DART_config={
        "K": 2, "image_token_start_index": start, "image_token_length": length, "max_num_trunction": budget,
        "pivot_image_token": pivot_image, "pivot_text_token": pivot_text, "reduction_ratio": None,
        "retain_token_num_for_llava_next": None})
    return set(get_retained_image_token(None, cfg, states, keys).tolist())


def test_accounting_follows_max_num_trunction():
    acc = DART(keep=128).accounting(576, 32)  # the authors' 128-token setting: 4 pivots + 8 * 16
    assert acc["equivalent_tokens"] == 132 and acc["tokens_per_layer"] == [576, 576] + [132] * 30
    assert acc["average_tokens"] == pytest.approx((2 * 576 + 30 * 132) / 32)
    assert DART(keep=64).accounting(576, 32)["equivalent_tokens"] == 4 + 8 * 8
    assert DART(keep=0.5, pivot_image=2, pivot_text=2).accounting(16, 4)["tokens_per_layer"] == [16, 16, 10, 10]


def test_bad_parameters_are_refused():
    with pytest.raises(InterventionError, match="keep: "):
        DART(keep=-1)
    with pytest.raises(InterventionError, match="pivot_image: "):
        DART(keep=8, pivot_image=0)
    with pytest.raises(InterventionError, match="layer: "):
        DART(keep=8, layer=4).check(models()[0])


def test_planted_duplicates_have_one_right_answer():
    # seq 24: image at 2..17, text after. One image pivot (largest key norm, state e1) at 5, one text pivot (e2) at
    # 20; tokens 9, 14 point away from e1 and 11, 16 away from e2: the least similar to each pivot, 2 per pivot.
    # Every other image token is a near-copy of e1 (a duplicate of the pivot): dropped.
    seq, d, start, length = 24, 8, 2, 16
    gen = torch.Generator().manual_seed(0)
    e1, e2 = torch.eye(d)[0], torch.eye(d)[1]
    states = e1 + 0.05 * torch.rand(seq, d, generator=gen)
    states[9], states[14], states[11], states[16], states[20] = -e1, -e1 + 0.01 * e2, -e2, -e2 + 0.01 * e1, e2
    norms = torch.rand(seq, generator=gen)
    norms[5], norms[20] = 10.0, 10.0
    truth = {5, 9, 14, 11, 16}
    keys = torch.zeros(1, 1, seq, d)
    keys[0, 0, :, 0] = norms  # L1 norm of each key = its planted norm
    assert reference(keys, states[None], start, length, 4, 1, 1) == truth
    cand = torch.zeros(1, seq, dtype=torch.bool)
    cand[0, start:start + length] = True
    text = torch.zeros_like(cand)
    text[0, start + length:] = True
    got = dart_keep(norms[None], states[None], cand, text, torch.tensor([2]), 1, 1)
    assert set(got[0].nonzero().flatten().tolist()) == truth


def layer_keys(eager, hidden: torch.Tensor, layer: int, positions: torch.Tensor) -> torch.Tensor:
    """Layer `layer`'s keys on its input `hidden` `[1, seq, d]`, after rotary and repeat_kv, as the reference's
    decoder layer returns them (computed here from the eager Hugging Face modules)."""
    lm = eager.model.model.language_model
    block = lm.layers[layer]
    attn = block.self_attn
    h = block.input_layernorm(hidden)
    k = attn.k_proj(h).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(h, positions)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return repeat_kv(k, attn.num_key_value_groups)


class PositionOrderedSet(set):
    """A set that iterates in increasing order (what `dart` visits pivots in)."""

    def __iter__(self):
        return iter(sorted(set.__iter__(self)))


@pytest.mark.parametrize("keep,pivots,ordered", [(0.75, (4, 4), False), (8, (4, 4), False), (0.75, (5, 3), False),
                                                 (8, (2, 2), True), (6, (3, 1), True)])
def test_kept_tokens_equal_the_reference_on_a_tiny_model(keep, pivots, ordered, monkeypatch):
    if ordered:
        from tests.reduction.reference import dart_reference

        monkeypatch.setattr(dart_reference, "set", PositionOrderedSet, raising=False)
    adapter, eager = models()
    batch = adapter.encode(samples(), padding_side="right")
    iv = DART(keep=keep, layer=2, pivot_image=pivots[0], pivot_text=pivots[1])
    out = Engine(adapter).run(batch, [iv])
    hs = eager_outputs(batch).hidden_states  # hs[l]: input of layer l
    positions = eager.position_ids(batch.inputs)
    norm = eager.model.model.language_model.norm
    for b in range(len(batch.samples)):
        n_valid = int((~batch.roles.padding[b]).sum())
        vis = batch.roles.visual[b].nonzero().flatten()
        start, length = int(vis[0]), len(vis)
        with torch.no_grad():
            keys = layer_keys(eager, hs[1][b:b + 1, :n_valid], 1, positions[b:b + 1, :n_valid])
            states = norm(hs[2][b:b + 1, :n_valid])
        budget = int(iv.budget.counts(torch.tensor(length)))
        expected = reference(keys, states, start, length, budget, *pivots)
        assert set(kept_after(out.context, 2)[b].nonzero().flatten().tolist()) == expected
        assert len(expected) == iv.accounting(length, adapter.n_llm_layers)["equivalent_tokens"]


def test_the_run_equals_a_hand_cut_run():
    """The tokens DART drops are absent from layer K on, at the kept tokens' original position ids: the final
    logits equal the eager Hugging Face layers run by hand with those tokens cut before layer K."""
    from tests.reduction.inllm_support import eager_layer

    adapter, eager = models()
    batch = adapter.encode(samples(), padding_side="left")
    out = Engine(adapter).run(batch, [DART(keep=8, layer=2, pivot_image=2, pivot_text=2)])
    embeds = Engine(adapter).embed(batch)
    positions = eager.position_ids(batch.inputs)
    for b in range(len(batch.samples)):
        valid = ~batch.roles.padding[b]
        h, idx = embeds[b][valid][None], valid.nonzero().flatten()
        for layer in range(4):
            if layer == 2:
                stay = out.context.present(2)[b][idx]
                assert 0 < int((~stay).sum()) < int(batch.roles.visual[b].sum())
                h, idx = h[:, stay], idx[stay]
            h = eager_layer(eager, layer, h, positions[b][idx])
        with torch.no_grad():
            expected = eager.model.lm_head(eager.model.model.language_model.norm(h))[0, -1]
        torch.testing.assert_close(out.logits()[b][int(batch.roles.last_index[b])], expected, atol=1e-4, rtol=0)

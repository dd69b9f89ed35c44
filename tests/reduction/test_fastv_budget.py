"""`fastv_budget`: FastV's choice of tokens at the shared budget, against a hand computation of the reference.

Reference: pkunlp-icler/FastV, src/transformers/src/transformers/models/llama/modeling_llama.py:746
(``last_layer_attention_avg_last_tok_image.topk(ATTENTION_RANK)``): keep the ATTENTION_RANK image tokens with
the highest head-mean attention from the last token in layer K-1 (the repository has no licence file, so its
code is not copied: the test computes the same from the eager model's own attention pattern).
"""

from __future__ import annotations

import pytest
import torch

from embedlens.errors import InterventionError
from embedlens.interventions import Engine
from embedlens.reduction.fastv import FastVBudget
from tests.reduction.inllm_support import eager_outputs, kept_after, models, samples


def test_accounting_matches_the_average_over_layers():
    # LLaVA-1.5: 576 tokens, 32 layers, K = 2: m = floor((32*64 - 2*576) / 30) = 29, mean (2*576 + 30*29)/32
    acc = FastVBudget(keep=64).accounting(576, 32)
    assert acc["tokens_per_layer"] == [576, 576] + [29] * 30
    assert acc["equivalent_tokens"] == pytest.approx((2 * 576 + 30 * 29) / 32) and acc["equivalent_tokens"] <= 64
    assert FastVBudget(keep=0.3333).accounting(576, 32)["tokens_per_layer"][2] == (32 * 192 - 2 * 576) // 30  # 166
    after = FastVBudget(keep=64, count="after").accounting(576, 32)
    assert after["tokens_per_layer"][2:] == [64] * 30 and after["budget"] == 64
    # a budget below what K full layers allow keeps one token; the accounting says the budget is not met
    low = FastVBudget(keep=2).accounting(36, 4)
    assert low["tokens_per_layer"] == [36, 36, 1, 1] and low["equivalent_tokens"] > 2


def test_bad_parameters_are_refused():
    with pytest.raises(InterventionError, match="keep: "):
        FastVBudget(keep=0)
    with pytest.raises(InterventionError, match="count: "):
        FastVBudget(keep=4, count="mean")
    with pytest.raises(InterventionError, match="layer: "):
        FastVBudget(keep=4, layer=4).check(models()[0])


def test_planted_attention_has_one_right_answer():
    adapter, _ = models()
    batch = adapter.encode(samples(), padding_side="left")
    eng = Engine(adapter)
    ctx = eng.context(batch)
    iv = FastVBudget(keep=3, layer=2, count="after")
    iv.setup(ctx)
    vis = batch.roles.visual
    planted = torch.zeros(vis.shape, dtype=torch.float)
    gen = torch.Generator().manual_seed(0)
    truth = torch.zeros_like(vis)
    for b in range(vis.shape[0]):
        pos = vis[b].nonzero().flatten()
        chosen = pos[torch.randperm(len(pos), generator=gen)[:3]]
        planted[b, pos] = 0.01
        planted[b, chosen] = torch.tensor([0.5, 0.4, 0.3])
        truth[b, chosen] = True
    ctx.attention[1] = planted[:, None, :].expand(-1, 4, -1)  # every head agrees
    iv.before_layer(ctx, 2)
    assert torch.equal(kept_after(ctx, 2), truth)
    assert torch.equal(kept_after(ctx, 1), vis)


@pytest.mark.parametrize("keep,count", [(0.5, "after"), (5, "after"), (12, "average")])
def test_kept_tokens_equal_the_reference_topk_on_a_tiny_model(keep, count):
    adapter, _ = models()
    batch = adapter.encode(samples(), padding_side="right")
    iv = FastVBudget(keep=keep, layer=2, count=count)
    out = Engine(adapter).run(batch, [iv])
    att = eager_outputs(batch).attentions[1]  # layer K-1 = 1
    last = batch.roles.last_index
    for b in range(len(batch.samples)):
        vis = batch.roles.visual[b].nonzero().flatten()
        n = len(vis)
        rank = iv.accounting(n, adapter.n_llm_layers)["tokens_per_layer"][2]  # ATTENTION_RANK
        score = att[b, :, last[b]].mean(0)[vis]
        expected = set(vis[score.topk(rank).indices].tolist())
        assert set(kept_after(out.context, 2)[b].nonzero().flatten().tolist()) == expected
        assert kept_after(out.context, 1)[b].sum() == n


def test_fastv_states_its_accounting_too():
    from embedlens.interventions.prune import FastV

    acc = FastV(layer=2, keep=0.5).accounting(576, 32)
    assert acc["tokens_per_layer"] == [576, 576] + [288] * 30 and acc["equivalent_tokens"] == (2 * 576 + 30 * 288) / 32
    assert FastV(layer=2, keep=0.5).accounting(15, 4)["tokens_per_layer"] == [15, 15, 8, 8]  # ceil, as it prunes

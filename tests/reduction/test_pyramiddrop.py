"""`pyramiddrop`: PyramidDrop's staged choice of tokens at the shared budget.

Reference: Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py, `pdrop_rank_drop` (lines 1322-1407):
before stage layer l, layer l's own attention on the previous layer's output, the last instruction token's row
(line 1391), head mean (line 1399), ``topk(keep_length)`` over the image tokens (line 1405) with
``keep_length = int(n * ratio[stage + 1])`` (line 1307). Computed here by hand from the eager model's attention.
"""

from __future__ import annotations

import pytest
import torch

from embedlens.errors import InterventionError
from embedlens.interventions import Engine
from embedlens.reduction.pyramiddrop import PyramidDrop, pdrop_schedule
from tests.reduction.inllm_support import eager_outputs, kept_after, models, samples


def test_the_authors_setting_is_what_its_budget_gives():
    # layer_list [8, 16, 24], lambda 0.5 on 576 tokens: 288 / 144 / 72, mean (8*576 + 8*288 + 8*144 + 8*72)/32 = 270
    acc = PyramidDrop(keep=270).accounting(576, 32)
    assert acc["tokens_per_layer"] == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert acc["equivalent_tokens"] == 270
    acc = PyramidDrop(keep=192).accounting(576, 32)  # the authors' layers, a smaller lambda
    assert acc["tokens_per_layer"][:9] == [576] * 8 + [acc["tokens_per_layer"][8]] and 184 < acc["equivalent_tokens"] <= 192
    # 128 and 64 of 576 are below 8 full layers of 32 (144 tokens): the layers move up so the first stage spends
    # half the budget (l1 = 64*32/576 = 3.6 -> 4 for 128; 1.8 -> 2 for 64)
    for keep, first in ((128, 4), (64, 2)):
        acc = PyramidDrop(keep=keep).accounting(576, 32)
        assert acc["tokens_per_layer"][first - 1] == 576 and acc["tokens_per_layer"][first] < 576
        assert keep - 8 < acc["equivalent_tokens"] <= keep
    # given layers are kept; a budget they cannot meet keeps one token per stage, and the accounting says so
    low = PyramidDrop(keep=64, layers=[8, 16, 24]).accounting(576, 32)
    assert low["tokens_per_layer"][8:] == [1] * 24 and low["equivalent_tokens"] > 64


def test_schedule_is_per_image_and_elementwise():
    n = torch.tensor([[576, 64], [96, 32]])
    got = pdrop_schedule(n * 15 // 32, n, [8, 16, 24], 32)  # 15/32 of n: lambda = 0.5 for every image
    assert torch.equal(got, torch.stack([n // 2, n // 4, n // 8], dim=-1))


def test_bad_parameters_are_refused():
    with pytest.raises(InterventionError, match="keep: "):
        PyramidDrop(keep=1.5)
    with pytest.raises(InterventionError, match="layers: "):
        PyramidDrop(keep=4, layers=[3, 2])
    with pytest.raises(InterventionError, match="layers: stage layer 9"):
        PyramidDrop(keep=4, layers=[1, 9]).check(models()[0])


def test_planted_attention_has_one_right_answer_per_stage():
    adapter, _ = models()
    batch = adapter.encode(samples(), padding_side="left")
    ctx = Engine(adapter).context(batch)
    iv = PyramidDrop(keep=0.5, layers=[1, 2])
    iv.setup(ctx)
    vis = batch.roles.visual
    gen = torch.Generator().manual_seed(0)
    for stage, layer in enumerate([1, 2]):
        planted = torch.rand(vis.shape, generator=gen)  # distinct scores: one right answer
        iv._scores[layer] = planted
        cand = vis & ctx.present(layer)
        iv.before_layer(ctx, layer)
        for b in range(vis.shape[0]):
            pos = cand[b].nonzero().flatten()
            k = int(iv._counts[layer][b, 0])
            truth = set(pos[planted[b, pos].topk(k).indices].tolist())
            assert set(kept_after(ctx, layer)[b].nonzero().flatten().tolist()) == truth


def test_each_image_runs_its_own_schedule_whatever_its_batch():
    """Images of 80, 48 and 32 tokens (tiny LLaVA-NeXT) at keep 12 of a 32-layer depth: the 80-token image's
    default layers are scaled down (80 * 8 > 12 * 32), the others' are the authors' [8, 16, 24]. Each image holds,
    layer by layer, what `accounting` of its own size says, batched together or alone."""
    from embedlens.data import Sample
    from embedlens.testing import tiny_batch
    from embedlens.testing.images import noise, shapes

    adapter, _ = tiny_batch("llava_next", n=1)
    both = [Sample([shapes(64, seed=1), noise(40, 70, seed=2)], question="what is it?", id="a"),
            Sample([shapes(32, seed=3)], question="count", id="b")]
    depth, gen = 32, torch.Generator().manual_seed(0)

    def per_layer(samples):
        batch = adapter.encode(samples, padding_side="left")
        ctx = Engine(adapter).context(batch)
        ctx.n_layers = depth  # the schedule of a 32-layer model, run by hand below
        ctx.exit = torch.where(ctx.valid, depth, 0)
        iv = PyramidDrop(keep=12)
        iv.setup(ctx)
        vis, image = batch.roles.visual, batch.roles.image
        for layer in range(depth):
            if layer in iv._layers:
                iv._scores[layer] = torch.rand(vis.shape, generator=gen)
            iv.before_layer(ctx, layer)
        return {(s.id, g): [int((ctx.present(layer) & vis & (image == g))[b].sum()) for layer in range(depth)]
                for b, s in enumerate(samples) for g in range(len(s.images))}

    together = per_layer(both)
    sizes = {key: counts[0] for key, counts in together.items()}
    assert sorted(sizes.values()) == [32, 48, 80]
    for key, counts in together.items():
        assert counts == PyramidDrop(keep=12).accounting(sizes[key], depth)["tokens_per_layer"], key
    assert per_layer(both[1:]) == {("b", 0): together[("b", 0)]}


def test_first_stage_equals_the_reference_topk_on_a_tiny_model():
    adapter, _ = models()
    batch = adapter.encode(samples(), padding_side="right")
    iv = PyramidDrop(keep=0.4)  # 4 layers: stages at [1, 2, 3]
    out = Engine(adapter).run(batch, [iv])
    att = eager_outputs(batch).attentions[1]  # stage layer 1's own attention, on layer 0's output (all tokens)
    last = batch.roles.last_index
    ctx = out.context
    for b in range(len(batch.samples)):
        vis = batch.roles.visual[b].nonzero().flatten()
        n = len(vis)
        per_layer = iv.accounting(n, adapter.n_llm_layers)["tokens_per_layer"]
        score = att[b, :, last[b]].mean(0)[vis]
        expected = set(vis[score.topk(per_layer[1]).indices].tolist())
        assert set(kept_after(ctx, 1)[b].nonzero().flatten().tolist()) == expected
        counts = [int(kept_after(ctx, layer)[b].sum()) for layer in range(4)]
        assert counts == per_layer
        for layer in range(1, 4):  # each stage keeps a subset of the last
            assert not (kept_after(ctx, layer)[b] & ~kept_after(ctx, layer - 1)[b]).any()


def test_every_stage_equals_a_hand_run_of_the_reference_rule():
    """A layer-by-layer run of the eager Hugging Face layers on one sample at a time: before each stage layer, that
    layer's own attention (HF's eager softmax) from the last token ranks the image tokens still present, the
    `topk` are kept (modeling_llama_pdrop.py:1405) and the rest cut from the sequence at their original position
    ids (the engine's convention; the reference renumbers them, its decoding then shifts them back)."""
    from tests.reduction.inllm_support import eager_layer, eager_layer_attention

    adapter, eager = models()
    batch = adapter.encode(samples(), padding_side="left")
    iv = PyramidDrop(keep=0.4, layers=[1, 2, 3])
    out = Engine(adapter).run(batch, [iv])
    embeds = Engine(adapter).embed(batch)
    positions = eager.position_ids(batch.inputs)
    for b in range(len(batch.samples)):
        keep = ~batch.roles.padding[b]
        vis = batch.roles.visual[b] & keep
        last = int(batch.roles.last_index[b])
        counts = iv.accounting(int(vis.sum()), 4)["tokens_per_layer"]
        h, idx = embeds[b][keep][None], keep.nonzero().flatten()
        for layer in range(4):
            if layer in (1, 2, 3):
                att = eager_layer_attention(eager, layer, h, positions[b][idx]).mean(0)[(idx == last).nonzero()[0, 0]]
                is_vis = vis[idx]
                top = att[is_vis].topk(counts[layer]).indices
                kept_vis = idx[is_vis][top]
                stay = ~is_vis | torch.isin(idx, kept_vis)
                h, idx = h[:, stay], idx[stay]
                assert set(kept_after(out.context, layer)[b].nonzero().flatten().tolist()) == set(kept_vis.tolist())
            h = eager_layer(eager, layer, h, positions[b][idx])
        assert idx[-1] == last  # no answer: the last prompt token ends the sequence
        with torch.no_grad():
            expected = eager.model.lm_head(eager.model.model.language_model.norm(h))[0, -1]
        torch.testing.assert_close(out.logits()[b][last], expected, atol=1e-4, rtol=0)  # the whole run, not just the choice

"""`random_budget` and `partition_budget`: the budget met per image, and the order each documents."""

from __future__ import annotations

import pytest
import torch

from embedlens.interventions import Engine
from embedlens.reduction.baselines import PartitionBudget, RandomBudget
from embedlens.signals import similarity_entropy
from embedlens.testing import tiny_batch


def _kept(adapter, batch, iv, groups=None):
    ctx = Engine(adapter).context(batch, groups=groups)
    cand = ctx.roles.visual & ctx.valid
    iv.setup(ctx)
    return ctx, cand, cand & (ctx.exit > 0)


def test_random_budget_keeps_the_budget_and_the_same_tokens_whatever_the_padding():
    adapter, left = tiny_batch("llava-clip", n=2, padding_side="left")
    _, right = tiny_batch("llava-clip", n=2, padding_side="right")
    picks = {}
    for side, batch in (("left", left), ("right", right)):
        _, cand, kept = _kept(adapter, batch, RandomBudget(keep=5, seed=3))
        assert kept.sum(1).tolist() == [5, 5]
        vt = batch.roles.visual_tokens()
        picks[side] = kept[vt["sample"], vt["position"]]  # in image order: independent of padding
    assert torch.equal(picks["left"], picks["right"])
    _, _, other = _kept(adapter, left, RandomBudget(keep=5, seed=4))
    vt = left.roles.visual_tokens()
    assert not torch.equal(other[vt["sample"], vt["position"]], picks["left"])  # the seed matters


def test_partition_budget_removes_dead_first_keeps_sinks_and_ranks_alive_by_entropy():
    """Planted groups on the tiny model: the kept set is, per image, the sinks, then the alive tokens of lowest
    vocabulary entropy, never a dead token while an alive one is dropped."""
    adapter, batch = tiny_batch("llava-clip", n=2, padding_side="left")
    vis = batch.roles.visual
    pos = torch.arange(vis.shape[1]).expand_as(vis)
    rank = vis.long().cumsum(1) - 1
    dead = vis & (rank % 4 == 1)  # planted: every fourth token dead, the first two of each image sinks
    sink = vis & (rank < 2)
    iv = PartitionBudget(keep=6, temperature=0.05)
    ctx, cand, kept = _kept(adapter, batch, iv, groups={"dead": dead, "sink": sink & ~dead, "alive": vis & ~dead & ~sink})
    emb = adapter.input_embeddings()
    with torch.no_grad():
        ent = similarity_entropy(ctx.embeds.reshape(-1, ctx.embeds.shape[-1]), emb, 0.05).reshape(vis.shape)
    for b in range(2):
        s = (sink & ~dead)[b]
        alive = (vis & ~dead & ~sink)[b]
        order = sorted(pos[b][alive].tolist(), key=lambda p: (float(ent[b, p]), p))
        want = set(pos[b][s].tolist()) | set(order[: 6 - int(s.sum())])
        assert set(kept[b].nonzero().flatten().tolist()) == want
    # sinks: drop -> removed right after the dead ones: with a budget of all alive tokens, no sink is kept
    n_alive = int((vis & ~dead & ~sink)[0].sum())
    _, _, kept2 = _kept(adapter, batch, PartitionBudget(keep=n_alive, sinks="drop"),
                        groups={"dead": dead, "sink": sink & ~dead, "alive": vis & ~dead & ~sink})
    assert not (kept2 & sink).any() and not (kept2 & dead).any()


def test_partition_budget_refuses_bad_values_by_name():
    from embedlens.errors import InterventionError

    with pytest.raises(InterventionError, match="sinks: must be 'keep' or 'drop'"):
        PartitionBudget(sinks="first")
    with pytest.raises(InterventionError, match="keep: a fraction must be in"):
        PartitionBudget(keep=1.5)
    for bad in (1.0, True, "1"):  # the draw is seeded by the seed's text: 1.0 would silently differ from 1
        with pytest.raises(InterventionError, match="seed: expected an integer"):
            RandomBudget(keep=2, seed=bad)


@pytest.mark.parametrize("cls", [RandomBudget, PartitionBudget])
def test_conforms(cls):
    from embedlens.testing.conformance import check_intervention

    check_intervention(cls, params={"keep": 0.5}, families=("llava-clip", "qwen2_vl"))


def test_an_empty_selection_leaves_the_sample_unchanged_and_cdpruner_needs_an_instruction():
    from embedlens.errors import InterventionError
    from embedlens.reduction.diversity import CDPruner

    adapter, batch = tiny_batch("llava-clip", n=2, padding_side="left")
    eng = Engine(adapter)
    base = eng.run(batch).last_logits()
    out = eng.run(batch, [RandomBudget(keep=2, tokens="visual and image == 5")]).last_logits()
    torch.testing.assert_close(out, base)
    with pytest.raises(InterventionError, match=r"instruction: selection 'bos and not bos' matches no text token in sample\(s\) \['s0', 's1'\]"):
        eng.run(batch, [CDPruner(keep=2, instruction="bos and not bos")])

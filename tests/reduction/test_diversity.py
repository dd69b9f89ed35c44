"""DivPrune and CDPruner choose the tokens their authors' algorithms choose.

CDPruner's selection code (Apache-2.0) runs on the same tensors. DivPrune's
code is CC BY-NC 4.0 and is not copied: its cases are computed by hand from
the published algorithm (vbdi/divprune ``LLaVA/llava/model/llava_arch.py``
lines 152-171: the first token maximises its second-smallest distance in its
column, each next one its minimum distance to the chosen set).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from embedlens.interventions import Engine
from embedlens.reduction.budget import Budget
from embedlens.reduction.diversity import CDPruner, DivPrune, cdpruner_select, divprune_select, instruction_relevance
from embedlens.testing import tiny_batch
from tests.reduction.reference.cdpruner import cdpruner


def divprune_by_hand(x: torch.Tensor, k: int) -> list[int]:
    """The published greedy rule, written with Python loops over one image's tokens (`x`: [n, d])."""
    xn = F.normalize(x.double(), dim=-1)
    dist = 1 - xn @ xn.T
    n = len(x)
    first = max(range(n), key=lambda i: (sorted(float(dist[j, i]) for j in range(n))[1], -i))
    chosen = [first]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(float(dist[s, i]) for s in chosen), -i)))
    return sorted(chosen)


def test_divprune_keeps_the_planted_spread():
    """Six unit 2-d tokens: three near the x axis, two near the y axis, one at 45 degrees between them. The diagonal
    one is taken first (its nearest neighbour is the farthest), then the far end of the x cluster (0), then the
    far end of the y cluster (4); never a second token of a cluster."""
    angles = torch.tensor([0.0, 0.05, 0.1, 1.47, 1.52, 0.785])
    x = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]
    image = torch.zeros(1, 6, dtype=torch.long)
    for k, want in [(2, [0, 5]), (3, [0, 4, 5])]:
        got = divprune_select(x, image >= 0, image, Budget.parse(k))[0].nonzero().flatten().tolist()
        assert got == want == divprune_by_hand(x[0], k)


@pytest.mark.parametrize("keep", [1, 4, 9, 0.25])
def test_divprune_equals_the_hand_rule_per_image(keep):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 30, 6, generator=gen)
    image = torch.full((2, 30), -1)
    image[0, 1:13], image[0, 14:29], image[1, 3:25] = 0, 1, 0
    got = divprune_select(x, image >= 0, image, Budget.parse(keep))
    for b, i in [(0, 0), (0, 1), (1, 0)]:
        idx = (image[b] == i).nonzero().flatten()
        k = int(Budget.parse(keep).counts(torch.tensor(len(idx))))
        assert got[b, idx].nonzero().flatten().tolist() == divprune_by_hand(x[b, idx], k)


@pytest.mark.parametrize("keep", [1, 3, 8, 0.5])
def test_cdpruner_equals_the_reference_per_image(keep):
    """Relevance planted per token; the reference's kernel, DPP loop and index mask on each image alone. The
    embeddings have more dimensions than an image has tokens, so the kernel has full rank and every greedy step
    has one right answer (past the rank, the gains are rounding noise)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 26, 24, generator=gen, dtype=torch.float64)
    image = torch.full((2, 26), -1)
    image[0, 1:11], image[0, 12:24], image[1, 2:22] = 0, 1, 0
    text = torch.zeros(2, 26, dtype=torch.bool)
    text[:, -2:] = True
    rel = instruction_relevance(x, text, image >= 0, image, negate=True)
    got = cdpruner_select(x, rel, image >= 0, image, Budget.parse(keep))
    for b, i in [(0, 0), (0, 1), (1, 0)]:
        idx = (image[b] == i).nonzero().flatten()
        k = int(Budget.parse(keep).counts(torch.tensor(len(idx))))
        # the reference relevance: image vs text embeddings in one space (here the same x), scaled over its batch
        want = cdpruner(x[b, idx][None], x[b, idx][None], x[b, text[b]], k)[0]
        assert torch.equal(got[b, idx], want)


def test_cdpruner_prefers_relevant_and_distinct_tokens():
    """Four tokens: two copies of one direction and two orthogonal ones, the last of low relevance. Budget 2: the
    DPP takes one copy (never both: their kernel rows are equal) and the relevant orthogonal token."""
    x = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    rel = torch.tensor([[1.0, 0.9, 0.8, 0.1]])
    image = torch.zeros(1, 4, dtype=torch.long)
    got = cdpruner_select(x, rel, image >= 0, image, Budget.parse(2))
    assert got[0].tolist() == [True, False, True, False]


@pytest.mark.parametrize("cls", [DivPrune, CDPruner])
def test_tiny_model_selection_equals_the_rule_on_its_embeddings(cls):
    adapter, batch = tiny_batch("llava-clip", n=2, padding_side="left")
    ctx = Engine(adapter).context(batch)
    cand = ctx.roles.visual & ctx.valid
    iv = cls(keep=5)
    iv.setup(ctx)
    kept = cand & (ctx.exit > 0)
    for b in range(2):
        idx = cand[b].nonzero().flatten()
        x = ctx.embeds[b, idx]
        if cls is DivPrune:
            want = divprune_by_hand(x, 5)
            assert kept[b, idx].nonzero().flatten().tolist() == want
        else:
            text = ctx.roles.question[b] & ctx.valid[b]
            want = cdpruner(x[None].double(), x[None].double(), ctx.embeds[b, text].double(), 5)[0]
            assert torch.equal(kept[b, idx], want)


@pytest.mark.parametrize("cls", [DivPrune, CDPruner])
def test_conforms(cls):
    from embedlens.testing.conformance import check_intervention

    check_intervention(cls, params={"keep": 0.5}, families=("llava-clip", "qwen2_vl"))

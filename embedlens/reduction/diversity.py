"""Methods that choose a diverse subset of the LLM's input tokens: DivPrune (max-min) and CDPruner (conditional DPP).

Both greedy loops run over the budget's steps (inherent to the algorithms),
for every image of the batch at once, on the device; the number of steps is
a bound known without reading the device (the budget, or its fraction of the
sequence), and an image whose budget is met stops taking tokens.
"""

from __future__ import annotations

import math

from embedlens.errors import InterventionError
from embedlens.interventions.base import parse_selection
from embedlens.interventions.context import Context
from embedlens.interventions.select import SelectionSpec
from embedlens.reduction._rank import group_sizes, image_groups
from embedlens.reduction.base import InputReduction
from embedlens.reduction.budget import Budget, BudgetPer
from embedlens.registry import interventions


def _steps(budget: Budget, seq: int) -> int:
    """At least as many greedy steps as any image's budget, from shapes alone."""
    return min(seq, budget.keep if not budget.is_fraction else math.ceil(budget.keep * seq))


def _group_pick(score: torch.Tensor, allowed: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """`[batch, seq]` bool: per group, the allowed token of highest score (the earliest on ties, as ``argmax``)."""
    import torch

    batch, seq = score.shape
    s = score.masked_fill(~allowed, float("-inf"))
    top = torch.full((batch, seq + 1), float("-inf"), dtype=s.dtype, device=s.device).scatter_reduce(1, group, s, "amax")
    at_top = allowed & (s == top.gather(1, group))
    pos = torch.arange(seq, device=s.device).expand(batch, seq)
    first = torch.full((batch, seq + 1), seq, device=s.device).scatter_reduce(1, group, torch.where(at_top, pos, seq), "amin")
    return at_top & (pos == first.gather(1, group))


def _taken(pick: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """`[batch, seq]` long: for each token, the position its group picked (`seq` where it picked none)."""
    import torch

    batch, seq = pick.shape
    pos = torch.arange(seq, device=pick.device).expand(batch, seq)
    first = torch.full((batch, seq + 1), seq, device=pick.device).scatter_reduce(1, group, torch.where(pick, pos, seq), "amin")
    return first.gather(1, group)


def divprune_select(x: torch.Tensor, candidates: torch.Tensor, image: torch.Tensor, budget: Budget) -> torch.Tensor:
    """DivPrune: per image, greedily keep the token farthest (cosine distance) from those kept so far.

    The first token is the one whose nearest other token is farthest; each next one maximises its minimum distance
    to the kept set. Reference: DivPrune ``LLaVA/llava/model/llava_arch.py`` lines 147-171 (`DivPrune`, on the
    LLM input embeddings of the image's tokens). Ties go to the earliest position (``argmax``). A token already kept
    is never taken again (the reference could take one twice only when exact duplicates tie at distance 0).

    Args:
        x: `[batch, seq, d]` the tokens' LLM input embeddings.
        candidates, image: as `Budget.keep_mask`.
    """
    import torch
    import torch.nn.functional as F

    batch, seq, _ = x.shape
    group = image_groups(candidates, image)
    k = budget.counts(group_sizes(group)).gather(1, group)  # each token's image budget
    xn = F.normalize(x.float(), dim=-1)
    dist = 1.0 - xn @ xn.transpose(1, 2)  # [batch, seq, seq]
    same = candidates[:, :, None] & candidates[:, None, :] & (group[:, :, None] == group[:, None, :])
    # step 0: each token's second-smallest distance within its image (the smallest is its own, 0)
    nearest = dist.masked_fill(~same, float("inf")).topk(min(2, seq), dim=1, largest=False).values[:, -1]
    kept = torch.zeros_like(candidates)
    min_dist = torch.full((batch, seq), float("inf"), device=x.device)
    for step in range(_steps(budget, seq)):
        score = nearest if step == 0 else min_dist
        pick = _group_pick(score, candidates & ~kept & (step < k), group)
        kept |= pick
        at = _taken(pick, group)  # [batch, seq]: the token its image took this step (seq: none)
        d = dist.gather(2, at.clamp(max=seq - 1)[..., None])[..., 0]
        min_dist = torch.where(at < seq, torch.minimum(min_dist, d), min_dist)
    return kept


def cdpruner_select(x: torch.Tensor, relevance: torch.Tensor, candidates: torch.Tensor, image: torch.Tensor,
                    budget: Budget) -> torch.Tensor:
    """CDPruner: per image, the greedy MAP of a DPP whose kernel is ``r_i * cos(x_i, x_j) * r_j``.

    Fast greedy MAP inference (Chen et al. 2018), as the reference: take the token of largest remaining marginal
    gain ``d_i^2``, then update every other token's Cholesky row. Reference: CDPruner
    ``llava/model/llava_arch.py`` lines 150-182. Ties go to the earliest position (``argmax``).

    Args:
        x: `[batch, seq, d]` the tokens' LLM input embeddings (the reference: the projector's output).
        relevance: `[batch, seq]` each token's relevance to the instruction (already normalised).
        candidates, image: as `Budget.keep_mask`.
    """
    import torch
    import torch.nn.functional as F

    batch, seq, _ = x.shape
    group = image_groups(candidates, image)
    k = budget.counts(group_sizes(group)).gather(1, group)
    xn = F.normalize(x.float(), dim=-1)
    same = candidates[:, :, None] & candidates[:, None, :] & (group[:, :, None] == group[:, None, :])
    rel = relevance.float()
    kernel = (rel[:, :, None] * (xn @ xn.transpose(1, 2)) * rel[:, None, :]).masked_fill(~same, 0.0)
    steps = _steps(budget, seq)
    cis = torch.zeros(steps, batch, seq, device=x.device)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    kept = torch.zeros_like(candidates)
    for i in range(steps):
        active = candidates & (i < k)
        pick = _group_pick(di2s, active & ~kept, group)
        kept |= pick
        at = _taken(pick, group)
        j = at.clamp(max=seq - 1)  # [batch, seq]: each token's image's pick
        took = (at < seq) & active
        k_j = kernel.gather(1, j[:, None, :])[:, 0]  # kernel[b, j_i, i]
        c_j = cis[:i].gather(2, j[None].expand(i, -1, -1))  # cis[t, b, j_i]
        eis = (k_j - (c_j * cis[:i]).sum(0)) / di2s.gather(1, j).sqrt()
        eis = torch.where(took, eis, torch.zeros_like(eis))
        cis[i] = eis
        di2s = torch.where(took, di2s - eis.square(), di2s)
    return kept


def instruction_relevance(x: torch.Tensor, text: torch.Tensor, candidates: torch.Tensor, image: torch.Tensor,
                          negate: bool) -> torch.Tensor:
    """`[batch, seq]`: each candidate's mean cosine to its sample's `text` tokens, negated as the reference does
    (``(-relevance).mean``) when `negate`, then min-max scaled per image to (0, 1] (``+ 1e-6`` as the reference)."""
    import torch
    import torch.nn.functional as F

    xn = F.normalize(x.float(), dim=-1)
    cos = xn @ xn.transpose(1, 2)  # [batch, seq, seq]; the text columns are the instruction
    rel = (cos * text[:, None, :]).sum(-1) / text.sum(1, keepdim=True).clamp(min=1)
    rel = -rel if negate else rel
    group = image_groups(candidates, image)
    batch, seq = rel.shape
    lo = torch.full((batch, seq + 1), float("inf"), device=x.device).scatter_reduce(1, group, rel.masked_fill(~candidates, float("inf")), "amin")
    hi = torch.full((batch, seq + 1), float("-inf"), device=x.device).scatter_reduce(1, group, rel.masked_fill(~candidates, float("-inf")), "amax")
    lo, hi = lo.gather(1, group), hi.gather(1, group)
    return torch.where(candidates, (rel - lo + 1e-6) / (hi - lo).clamp(min=1e-12), torch.zeros_like(rel))


@interventions.register("divprune")
class DivPrune(InputReduction):
    """DivPrune: keep a max-min diverse subset of each image's tokens (cosine distance of the LLM input embeddings).

    Reference: DivPrune ``LLaVA/llava/model/llava_arch.py`` lines 147-171 (`divprune_select`). The reference's
    budget is ``round(ratio * n)``; here it is `keep` (a fraction rounds up, as every method's). On LLaVA-NeXT the
    reference runs over the image's whole span, newline tokens included; here over its visual tokens.

    Args:
        keep: tokens kept per image (an int), or a fraction of them in (0, 1] (rounded up).
        tokens: the image tokens the budget is taken from.
        per: ``image`` (one budget per image, a video counting as one) or ``frame`` (one per frame of a video).

    Example:
        >>> DivPrune(keep=64).keep
        64
    """

    def __init__(self, keep: int | float = 64, tokens: SelectionSpec = "visual", per: BudgetPer = "image"):
        self._init_budget(keep, tokens, per)

    def choose(self, ctx: Context, candidates: torch.Tensor) -> torch.Tensor:
        return divprune_select(ctx.embeds, candidates, self.groups(ctx), self.budget)


@interventions.register("cdpruner")
class CDPruner(InputReduction):
    """CDPruner: keep the greedy MAP subset of a DPP conditioned on the instruction.

    The kernel is ``r_i * cos(x_i, x_j) * r_j`` over each image's LLM input embeddings ``x``, with ``r`` the
    tokens' relevance to the `instruction` tokens. The reference measures relevance with CLIP's own text tower
    (``CLIPTextModelWithProjection``) against CLIP-projected patches; Hugging Face LLaVA checkpoints ship no text
    tower, so here both sides are LLM input embeddings (the instruction's token embeddings, the visual tokens).
    The reference negates the mean similarity (its authors saw CLIP's patches anti-align with relevant text,
    CDPruner issue #14); `negate` keeps that, and is a parameter because the LLM's embedding space is not CLIP's.
    The reference scales relevance over the whole batch; here per image, so a sample's choice never depends on
    its batch. Reference: CDPruner ``llava/model/llava_arch.py`` lines 141-185 (`cdpruner_select`).

    Args:
        keep: tokens kept per image (an int), or a fraction of them in (0, 1] (rounded up).
        instruction: the text tokens relevance is measured against (default: the question).
        negate: negate the mean similarity before scaling, as the reference.
        tokens: the image tokens the budget is taken from.
        per: ``image`` (one budget per image, a video counting as one) or ``frame`` (one per frame of a video).

    Example:
        >>> CDPruner(keep=64).negate
        True
    """

    def __init__(self, keep: int | float = 64, instruction: SelectionSpec = "question", negate: bool = True,
                 tokens: SelectionSpec = "visual", per: BudgetPer = "image"):
        if not isinstance(negate, bool):
            raise InterventionError(f"negate: expected true or false; got {negate!r}")
        self._init_budget(keep, tokens, per)
        self.instruction, self.negate = instruction, negate
        self.instruction_sel = parse_selection(instruction, "instruction")

    def choose(self, ctx: Context, candidates: torch.Tensor) -> torch.Tensor:
        text = ctx.select(self.instruction_sel) & ctx.roles.text & ctx.valid
        # a sample with image tokens needs an instruction to measure relevance against; one without has nothing to prune
        missing = candidates.any(dim=1) & ~text.any(dim=1)
        if bool(missing.any()):  # one read per batch, in setup (as every selection check)
            raise InterventionError(
                f"instruction: selection {self.instruction!r} matches no text token in sample(s) {ctx.sample_ids(missing)}; "
                "CDPruner measures each image token's relevance against it: pick text every sample has (e.g. question)")
        rel = instruction_relevance(ctx.embeds, text, candidates, ctx.roles.image, self.negate)
        return cdpruner_select(ctx.embeds, rel, candidates, self.groups(ctx), self.budget)

"""Two policies at the shared budget that no author owns: random tokens, and the EmbedLens partition's order."""

from __future__ import annotations

import math
from typing import Literal

from embedlens.errors import InterventionError
from embedlens.interventions.base import parse_selection
from embedlens.interventions.context import Context
from embedlens.interventions.prune import sample_seed
from embedlens.interventions.select import SelectionSpec
from embedlens.reduction.base import InputReduction
from embedlens.reduction.budget import BudgetPer
from embedlens.registry import interventions
from embedlens.signals import similarity_entropy


@interventions.register("random_budget")
class RandomBudget(InputReduction):
    """Random tokens at the budget: each image keeps `keep` of its tokens drawn uniformly at random.

    The draw is seeded by `seed`, the sample's id and its tokens (as `prune_random_matched`), so it does not depend
    on batching, padding or the device. UniPruneBench found this a strong baseline.

    Args:
        keep: tokens kept per image (an int), or a fraction of them in (0, 1] (rounded up).
        seed: seeds the per-sample draw.
        tokens: the image tokens the budget is taken from.
        per: ``image`` (one budget per image, a video counting as one) or ``frame`` (one per frame of a video).

    Example:
        >>> RandomBudget(keep=64, seed=1).seed
        1
    """

    budget_control = True  # every method at the same keep is compared with it (embedlens.plan.effects.matched_controls)

    def __init__(self, keep: int | float = 64, seed: int = 0, tokens: SelectionSpec = "visual", per: BudgetPer = "image"):
        if isinstance(seed, bool) or not isinstance(seed, int):  # the draw hashes its text: 1, 1.0 and True would differ
            raise InterventionError(f"seed: expected an integer; got {seed!r}")
        self._init_budget(keep, tokens, per)
        self.seed = seed

    def choose(self, ctx: Context, candidates: torch.Tensor) -> torch.Tensor:
        # one uniform score per unpadded token, drawn on the host from a per-sample generator (the same tokens
        # whatever the device or padding); the scores cross to the device once
        import torch

        ids, padding = ctx.batch.input_ids.cpu(), ctx.batch.roles.padding.cpu()
        scores = torch.zeros(padding.shape, dtype=torch.float64)
        for b, sample in enumerate(ctx.batch.samples):
            keep = ~padding[b]
            gen = torch.Generator().manual_seed(sample_seed(self.seed, sample.id, ids[b][keep]))
            scores[b, keep] = torch.rand(int(keep.sum()), generator=gen, dtype=torch.float64)
        return self.budget.keep_mask(scores.to(candidates.device), candidates, self.groups(ctx))


@interventions.register("partition_budget")
class PartitionBudget(InputReduction):
    """EmbedLens's order at the budget: dead tokens go first, sinks stay, alive tokens ranked by how nameable they are.

    Per image, tokens are removed in this order until `keep` remain: the `dead` group (no image-specific meaning:
    the study found pruning them barely changes answers), then the alive tokens whose vocabulary neighbours are
    flattest (highest entropy of ``softmax(cos(token, input embeddings) / temperature)``: the least nameable
    content), and the `sink` group last (``sinks: keep``): they are a handful of tokens per image that the LLM's
    attention settles on; removing them moves that attention mass onto the content tokens, which changes every
    later layer (massive-activation and attention-sink studies), while keeping them costs a few tokens of the
    budget. ``sinks: drop`` removes them right after the dead ones instead, to measure that choice. The groups
    come from the run's partition (`embedlens.groups.Partition`); ties go to the earlier position.

    Args:
        keep: tokens kept per image (an int), or a fraction of them in (0, 1] (rounded up).
        dead: the group removed first.
        sink: the sink group.
        sinks: ``keep`` (removed last) or ``drop`` (removed right after the dead tokens).
        temperature: softmax temperature of the entropy over cosine similarities (the partition's default).
        tokens: the image tokens the budget is taken from.
        per: ``image`` (one budget per image, a video counting as one) or ``frame`` (one per frame of a video).

    Example:
        >>> PartitionBudget(keep=64).sinks
        'keep'
    """

    def __init__(self, keep: int | float = 64, dead: SelectionSpec = "dead", sink: SelectionSpec = "sink",
                 sinks: Literal["keep", "drop"] = "keep", temperature: float = 0.05, tokens: SelectionSpec = "visual", per: BudgetPer = "image"):
        if sinks not in ("keep", "drop"):
            raise InterventionError(f"sinks: must be 'keep' or 'drop'; got {sinks!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise InterventionError(f"temperature: expected a positive number; got {temperature!r}")
        self._init_budget(keep, tokens, per)
        self.dead, self.sink, self.sinks, self.temperature = dead, sink, sinks, float(temperature)
        self.dead_sel, self.sink_sel = parse_selection(dead, "dead"), parse_selection(sink, "sink")

    def choose(self, ctx: Context, candidates: torch.Tensor) -> torch.Tensor:
        return self.budget.keep_mask(self.scores(ctx, candidates), candidates, self.groups(ctx))

    def scores(self, ctx: Context, candidates: torch.Tensor) -> torch.Tensor:
        """`[batch, seq]` float64: the tier (dead 0, sinks 3 or 1, alive 2) plus a share in [0, 1) for alive tokens
        (1 - normalised entropy): higher is kept first."""
        import torch

        dead = ctx.select(self.dead_sel) & candidates
        sink = ctx.select(self.sink_sel) & candidates & ~dead
        batch, seq, d = ctx.embeds.shape
        vocab = ctx.adapter.input_embeddings()
        ent = similarity_entropy(ctx.embeds.reshape(-1, d), vocab, self.temperature).reshape(batch, seq).to(candidates.device)
        peaked = (1.0 - ent.double() / math.log(vocab.shape[0])).clamp(0.0, 1.0 - 1e-9)
        tier = torch.where(dead, 0.0, torch.where(sink, 3.0 if self.sinks == "keep" else 1.0, 2.0)).double()
        return tier + torch.where(dead | sink, 0.0, peaked)

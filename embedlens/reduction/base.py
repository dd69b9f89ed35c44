"""What every method that picks tokens before the LLM shares: the budget, the candidates, the removal."""

from __future__ import annotations

from abc import abstractmethod

from embedlens.interventions.base import Intervention, parse_selection
from embedlens.interventions.context import Context
from embedlens.interventions.select import SelectionSpec
from embedlens.reduction.budget import Budget


class InputReduction(Intervention):
    """Keeps `keep` of each image's `tokens` (or of each frame's, ``per: frame``) at the LLM input and removes the
    rest from every layer.

    Subclasses implement `choose` (the kept set, on the device). Kept tokens keep their original position ids, as
    `prune` does; a token that is not a candidate (text, image newlines) is never removed, and a sample whose
    `tokens` selection is empty runs unchanged (there is nothing to reduce).
    """

    keep: int | float
    tokens: SelectionSpec
    per: str

    def _init_budget(self, keep: int | float, tokens: SelectionSpec, per: str = "image") -> None:
        Budget.parse(keep, "keep", per)  # the plan's values, checked when the plan is read
        self.keep, self.tokens, self.per = keep, tokens, per
        self.selection = parse_selection(tokens, "tokens")

    @property
    def budget(self) -> Budget:
        """`keep` and `per` as a `Budget` (derived, never stored: a checkpoint holds the plan's values only)."""
        return Budget.parse(self.keep, "keep", self.per)

    def groups(self, ctx: Context) -> torch.Tensor:
        """`[batch, seq]` long: each token's budget group (`Budget.groups`: its image, or its image and frame)."""
        return self.budget.groups(ctx.roles)

    def candidates(self, ctx: Context) -> torch.Tensor:
        """`[batch, seq]` bool: the tokens the budget is taken from (the selection, within the images)."""
        return ctx.select(self.selection, within=ctx.roles.image_span) & ctx.valid

    @abstractmethod
    def choose(self, ctx: Context, candidates: torch.Tensor) -> torch.Tensor:
        """`[batch, seq]` bool, a subset of `candidates`: the tokens kept."""

    def setup(self, ctx: Context) -> None:
        import torch

        self.check(ctx.adapter)  # also when run by the engine directly: a model the method cannot read is refused by name
        cand = self.candidates(ctx)
        kept = self.choose(ctx, cand) & cand
        ctx.exit = torch.where(cand & ~kept, torch.zeros_like(ctx.exit), ctx.exit)

"""FastV at a token budget (`fastv_budget`): the `fastv` criterion, with K and R set from the shared `keep`.

Reference: pkunlp-icler/FastV, ``src/transformers/src/transformers/models/llama/modeling_llama.py`` line 746:
``last_layer_attention_avg_last_tok_image.topk(ATTENTION_RANK)``: the image tokens the last prompt token
attends to most in layer K-1 (head mean) are kept, the rest removed from layer K on.
"""

from __future__ import annotations

from typing import Literal

from embedlens.errors import InterventionError
from embedlens.interventions.base import Intervention, parse_selection
from embedlens.interventions.context import Context
from embedlens.interventions.select import SelectionSpec
from embedlens.reduction.budget import Budget, BudgetPer
from embedlens.reduction.inllm import ParametersOnly, check_accounting_args, drop_from, make_accounting
from embedlens.registry import interventions

FastVCount = Literal["average", "after"]


def fastv_kept(k: torch.Tensor, n: torch.Tensor, layer: int, n_layers: int, count: FastVCount) -> torch.Tensor:
    """Tokens FastV keeps after layer K (`layer`) of an image of `n` tokens at budget `k` (elementwise, long).

    ``count: after`` keeps `k` (as the tables that quote "FastV at 64 tokens" run it). ``count: average`` keeps
    the largest m in 1..n whose average over the layers, ``(K·n + (L−K)·m) / L``, does not pass `k`: FastV's K and
    R matched to the budget as an equivalent average count.
    """
    import torch

    if count == "after":
        m = k
    else:
        m = torch.div(n_layers * k - layer * n, n_layers - layer, rounding_mode="floor")
    return torch.minimum(torch.clamp(m, min=1), n)


@interventions.register("fastv_budget")
class FastVBudget(ParametersOnly, Intervention):
    """FastV at the shared budget: after layer K, keep the image tokens the last prompt token attends to most.

    FastV (Chen et al., 2024) ranks by layer K-1's attention (head mean) and keeps so many that the budget is met.

    The attention row is recomputed from layer K-1's queries and keys (works with SDPA). With
    ``count: average`` (the default) the kept count after K is set so that the mean number of the image's
    tokens over the LLM's layers is at most the budget (`accounting`); with ``count: after`` the budget is
    what is kept after K. Ties in attention keep the earlier token (`Budget.keep_mask`); `fastv` with a
    fraction ``keep`` keeps its own rule (drop the lowest, the earlier first), unchanged.

    Args:
        keep: the budget: tokens per image (int) or a fraction of them in (0, 1].
        layer: K: tokens are ranked by layer K-1's last-token attention and dropped from layer K on
            (1..n_layers-1).
        count: ``average`` (the budget is the mean over layers) or ``after`` (the budget is kept after K).
        tokens: the tokens ranked (the others always stay); per image.
        per: ``image`` (one budget per image, a video counting as one) or ``frame`` (one per frame of a video).

    Example:
        >>> FastVBudget(keep=64).accounting(576, 32)["tokens_per_layer"][2]
        29
    """

    def __init__(self, keep: int | float, layer: int = 2, count: FastVCount = "average", tokens: SelectionSpec = "visual",
                 per: BudgetPer = "image"):
        self.budget = Budget.parse(keep, "keep", per)
        self.per = per
        if count not in ("average", "after"):
            raise InterventionError(f"count: must be 'average' or 'after'; got {count!r}")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise InterventionError(f"layer: FastV prunes after layer K >= 1; got {layer!r}")
        self.keep, self.layer, self.count, self.tokens = keep, layer, count, tokens
        self.selection = parse_selection(tokens, "tokens")

    def check(self, adapter) -> None:
        n = adapter.n_llm_layers
        if not 1 <= self.layer <= n - 1:
            raise InterventionError(f"layer: FastV prunes after layer K with 1 <= K <= {n - 1}; got {self.layer}")

    def accounting(self, n_visual: int, n_layers: int) -> dict:
        """The schedule for one image of `n_visual` tokens in an `n_layers`-layer LLM, and its equivalent count.

        FastV's paper states K and R; the equivalent count is the mean over layers of the tokens each holds:
        ``(K·n + (L−K)·m) / L`` with m kept after K.
        """
        import torch

        check_accounting_args(n_visual, n_layers)
        if not 1 <= self.layer <= n_layers - 1:
            raise InterventionError(f"layer: FastV prunes after layer K with 1 <= K <= {n_layers - 1}; got {self.layer}")
        n = torch.tensor(n_visual)
        k = self.budget.counts(n)
        m = int(fastv_kept(k, n, self.layer, n_layers, self.count))
        per_layer = [n_visual] * self.layer + [m] * (n_layers - self.layer)
        rule = (f"FastV: all {n_visual} tokens in layers 0..{self.layer - 1}, the {m} ranked highest by layer "
                f"{self.layer - 1}'s last-token attention from layer {self.layer} on (R = {1 - m / n_visual:.3f}); "
                + ("m is the largest count whose mean over the layers, (K*n + (L-K)*m)/L, does not pass the budget; "
                   "equivalent = that mean" if self.count == "average" else "m = the budget; equivalent = that mean"))
        return make_accounting(int(k), per_layer, sum(per_layer) / n_layers, rule)

    def setup(self, ctx: Context) -> None:
        self.check(ctx.adapter)
        self._candidates = ctx.select(self.selection, within=ctx.roles.image_span)
        ctx.request_last_attention(self.layer - 1)

    def before_layer(self, ctx: Context, layer: int) -> None:
        if layer != self.layer:
            return
        att = ctx.attention[layer - 1].mean(dim=1)  # [batch, seq]
        cand = self._candidates & ctx.present(layer - 1)

        def counts(n: torch.Tensor) -> torch.Tensor:
            return fastv_kept(self.budget.counts(n), n, self.layer, ctx.n_layers, self.count)

        keep = self.budget.keep_mask(att, cand, self.budget.groups(ctx.roles), counts=counts)
        drop_from(ctx, cand & ~keep, layer)

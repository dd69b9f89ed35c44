"""PyramidDrop at a token budget (`pyramiddrop`): staged dropping by the last instruction token's attention.

Reference: Cooperx521/PyramidDrop (MIT), ``llava/model/modeling_llama_pdrop.py``: `pdrop_forward` (line 1222:
``rank_layer = layer_idx + 1``; rank & drop before each layer of ``layer_list``) and `pdrop_rank_drop` (lines
1322-1407: layer ``rank_layer``'s own norm, q/k projections and rotary on the previous layer's output; the last
instruction token's query (line 1391, ``prompt_total_len - 1``); softmax over every key; head mean; keep the
``topk(keep_length)`` image tokens, ``keep_length = int(n * image_token_ratio_list[stage + 1])`` of the image's
original n (line 1307)). The authors run ``layer_list [8, 16, 24]`` with ratios ``λ, λ², λ³``, λ = 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

from embedlens.errors import InterventionError
from embedlens.interventions.base import Intervention, parse_selection
from embedlens.interventions.context import AttentionInput, Context
from embedlens.interventions.select import SelectionSpec
from embedlens.reduction.budget import Budget, BudgetPer
from embedlens.reduction.inllm import ParametersOnly, attention_layers_near, check_accounting_args, drop_from, image_sizes, make_accounting, query_attention, scaled_layers
from embedlens.registry import interventions

REFERENCE_LAYERS = (8, 16, 24)  # the authors' layer_list, for LLaVA-1.5's 32 layers
REFERENCE_DEPTH = 32
_BISECTIONS = 48


def pdrop_schedule(k: torch.Tensor, n: torch.Tensor, layers: Sequence[int], n_layers: int) -> torch.Tensor:
    """Tokens kept in each stage after the first, for images of `n` tokens at budget `k` (elementwise).

    Stage s (from ``layers[s-1]`` on) keeps ``floor(n·λ^s)`` tokens (at least 1), the reference's
    ``int(n * ratio)``; λ is the largest ratio in (0, 1] whose continuous mean over the layers,
    ``n·(l₁ + (l₂−l₁)λ + (l₃−l₂)λ² + (L−l₃)λ³) / L``, does not pass `k` (bisection, on the device). A budget
    below ``n·l₁/L`` cannot be met with these layers: λ goes to its lower end and every stage keeps one token.

    Returns:
        `[*n.shape, len(layers)]` long.
    """
    import torch

    bounds = list(layers) + [n_layers]
    lengths = torch.tensor([bounds[s + 1] - bounds[s] for s in range(len(layers))], dtype=torch.float64, device=n.device)
    powers = torch.arange(1, len(layers) + 1, dtype=torch.float64, device=n.device)
    nf, kf = n.double()[..., None], k.double()[..., None]

    def mean(lam: torch.Tensor) -> torch.Tensor:
        return nf[..., 0] * (layers[0] + (lengths * lam[..., None] ** powers).sum(-1)) / n_layers

    lo, hi = torch.zeros_like(nf[..., 0]), torch.ones_like(nf[..., 0])
    for _ in range(_BISECTIONS):  # a fixed number of device steps: no host read decides when to stop
        mid = (lo + hi) / 2
        ok = mean(mid) <= kf[..., 0]
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    counts = (nf * lo[..., None] ** powers + 1e-9).floor().long()
    return torch.minimum(torch.clamp(counts, min=1), n.long()[..., None])


@interventions.register("pyramiddrop")
class PyramidDrop(ParametersOnly, Intervention):
    """PyramidDrop at the shared budget: staged drops by the last instruction token's attention.

    PyramidDrop (Xing et al., 2024): before each stage layer, keep the image tokens the last instruction token
    attends to most, fewer at each stage (a geometric ratio λ).

    Before stage layer l, layer l's own attention (its norm, queries, keys and rotary, on the tokens layer l-1
    held) is recomputed for the last prompt token only; the tokens it attends to least are absent from layer l
    on. λ is set from the budget so that the image's mean token count over the layers is at most `keep`
    (`accounting`). Ties keep the earlier token (the reference's ``topk`` leaves them to the kernel).

    Args:
        keep: the budget: tokens per image (int) or a fraction of them in (0, 1].
        layers: the stage layers (strictly increasing, 1..n_layers-1); by default the authors' [8, 16, 24] of
            32 layers at the same relative depth of the model, scaled down together for a budget their first
            stage alone would pass (`stage_layers`; each image's layers follow its own size, so images of one batch
            may differ). On a hybrid model (Qwen3.5) the default stages move to the nearest attention layers
            (`attention_layers_near`); a linear-attention layer given here is refused by name.
        tokens: the tokens ranked (the others always stay); per image.
        per: ``image`` (one budget per image, a video counting as one) or ``frame`` (one per frame of a video).

    Example:
        >>> [round(PyramidDrop(keep=0.5).accounting(576, 32)["equivalent_tokens"])]
        [288]
    """

    def __init__(self, keep: int | float, layers: list[int] | None = None, tokens: SelectionSpec = "visual",
                 per: BudgetPer = "image"):
        self.budget = Budget.parse(keep, "keep", per)
        self.per = per
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not layers or any(isinstance(v, bool) or not isinstance(v, int) for v in layers):
                raise InterventionError(f"layers: expected a non-empty list of layer indices; got {layers!r}")
            if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 1:
                raise InterventionError(f"layers: stage layers must be >= 1 and strictly increasing; got {list(layers)}")
        self.keep, self.layers, self.tokens = keep, layers, tokens
        self.selection = parse_selection(tokens, "tokens")

    def stage_layers(self, n_layers: int, n_visual: int | None = None) -> list[int]:
        """The stage layers: `layers`, or the authors' [8, 16, 24] of 32 at the model's depth. Where the full
        first stage alone would pass the budget of an image of `n_visual` tokens (``n·l₁/L > k``: 128 or 64 of
        LLaVA-1.5's 576), the default layers are scaled down together so that it spends half of it."""
        if self.layers is not None:
            if self.layers[-1] > n_layers - 1:
                raise InterventionError(f"layers: stage layer {self.layers[-1]} is out of range for this model (1..{n_layers - 1})")
            return list(self.layers)
        layers = scaled_layers(REFERENCE_LAYERS, REFERENCE_DEPTH, n_layers)
        if n_visual is not None:
            import torch

            k = int(self.budget.counts(torch.tensor(n_visual)))
            if n_visual * layers[0] > k * n_layers:
                scale = (k * n_layers / 2) / (n_visual * REFERENCE_LAYERS[0] * n_layers / REFERENCE_DEPTH)
                layers = scaled_layers([v * scale for v in REFERENCE_LAYERS], REFERENCE_DEPTH, n_layers)
        return layers

    def check(self, adapter) -> None:
        self.stage_layers(adapter.n_llm_layers)

    def accounting(self, n_visual: int, n_layers: int) -> dict:
        """The stages for one image of `n_visual` tokens in an `n_layers`-layer LLM, and its equivalent count:
        as the paper counts, the mean over layers of the tokens each layer holds."""
        import torch

        check_accounting_args(n_visual, n_layers)
        layers = self.stage_layers(n_layers, n_visual)
        n = torch.tensor(n_visual)
        k = self.budget.counts(n)
        counts = pdrop_schedule(k, n, layers, n_layers).tolist()
        per_layer = [n_visual] * layers[0]
        for s, c in enumerate(counts):
            per_layer += [c] * ((layers + [n_layers])[s + 1] - layers[s])
        rule = (f"PyramidDrop: stages at layers {layers}, keeping {counts} of {n_visual} (floor(n*lambda^s)); lambda is "
                "the largest ratio whose mean over the layers does not pass the budget; equivalent = the mean over "
                "layers of the tokens each holds")
        return make_accounting(int(k), per_layer, sum(per_layer) / n_layers, rule)

    def setup(self, ctx: Context) -> None:
        import torch

        self._candidates = ctx.select(self.selection, within=ctx.roles.image_span)
        self._groups = self.budget.groups(ctx.roles)  # each token's image (or image and frame: `per`)
        n0 = image_sizes(self._candidates, self._groups)  # each group's original count, [batch, seq + 1]
        n0[:, -1] = 0
        # each image's stages are its own (`accounting` of its size), whatever else is in the batch: the default
        # layers follow the image's size, so images of different sizes can have different stage layers (one host
        # read of the sizes per batch, in setup; none when `layers` is given)
        if self.layers is not None:
            by_layers = {tuple(self.layers): None}
        else:
            sizes = sorted(set(n0[n0 > 0].tolist())) or [1]
            by_layers: dict[tuple[int, ...], list[int] | None] = {}
            for n in sizes:
                # on a hybrid model the default stages rank at attention layers
                layers = attention_layers_near(self.stage_layers(ctx.n_layers, n), ctx.adapter, 1, ctx.n_layers - 1)
                by_layers.setdefault(tuple(layers), []).append(n)
        counts = self.budget.counts(n0)
        self._counts: dict[int, torch.Tensor] = {}  # layer -> [batch, seq + 1] tokens kept from it on, -1: no stage
        for layers, ns in by_layers.items():
            mine = n0 > 0 if ns is None else torch.isin(n0, torch.tensor(ns, device=n0.device))
            kept = pdrop_schedule(counts, n0, layers, ctx.n_layers)
            for stage, layer in enumerate(layers):
                before = self._counts.get(layer, torch.full_like(n0, -1))
                self._counts[layer] = torch.where(mine, kept[..., stage], before)
        self._layers = sorted(self._counts)
        self._scores: dict[int, torch.Tensor] = {}
        last = ctx.roles.last_index[:, None]
        seq, home = ctx.roles.kind.shape[1], ctx.valid.device

        for layer in self._layers:
            def read(seen: AttentionInput, layer: int = layer) -> None:
                self._scores[layer] = query_attention(seen, last, seq, home)[:, :, 0].mean(dim=1)  # [batch, seq]

            ctx.probe_attention(layer, read, ahead=True)

    def before_layer(self, ctx: Context, layer: int) -> None:
        import torch

        if layer not in self._scores:
            return
        cand = self._candidates & ctx.present(layer)  # what would enter the layer
        kept = self._counts[layer]
        keep = self.budget.keep_mask(self._scores.pop(layer), cand, self._groups,
                                     counts=lambda n: torch.where(kept >= 0, kept, n))  # no stage here: all stay
        drop_from(ctx, cand & ~keep, layer)

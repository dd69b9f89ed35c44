"""DART at a token budget (`dart`): keep the image tokens least like a few pivots (duplication-aware).

Reference: ZichenWen1/DART (Apache-2.0), read in its fork xqy1111111/DART at d6a5af6,
``llava/model/language_model/modeling_llama_self.py``: before layer K (line 337), the previous layer's output
through the model's final norm (line 341) and that layer's keys (line 342, after rotary); `get_retained_image_token`
(lines 397-449): the ``pivot_image_token`` image tokens and ``pivot_text_token`` tokens after the image with the
largest key L1 norm are pivots (lines 421-424); for each pivot in turn, the ``TOKEN_TOPK = MAX // (pivots)``
remaining image tokens least cosine-similar to it are kept (lines 428-437); the image pivots are kept too.
"""

from __future__ import annotations

from embedlens.adapters.base import resolve_path
from embedlens.attention import attention_keys
from embedlens.errors import InterventionError
from embedlens.interventions.base import Intervention, parse_selection
from embedlens.interventions.context import AttentionInput, Context, Rows
from embedlens.interventions.select import SelectionSpec
from embedlens.reduction.budget import Budget, BudgetPer
from embedlens.reduction.inllm import ParametersOnly, check_accounting_args, drop_from, make_accounting, top_per_sample
from embedlens.registry import interventions

def dart_keep(norms: torch.Tensor, states: torch.Tensor, candidates: torch.Tensor, text: torch.Tensor,
              per_pivot: torch.Tensor, pivot_image: int, pivot_text: int) -> torch.Tensor:
    """DART's kept tokens of one image per sample.

    Args:
        norms: `[batch, seq]` L1 norm of each token's key in layer K-1 (the pivot criterion).
        states: `[batch, seq, d]` layer K-1's output through the final norm (the duplication criterion).
        candidates: `[batch, seq]` bool, the image's tokens.
        text: `[batch, seq]` bool, the tokens after the image that may be text pivots.
        per_pivot: `[batch]` long, tokens each pivot keeps (the reference's ``TOKEN_TOPK``).
        pivot_image, pivot_text: pivots of each kind.

    Returns:
        `[batch, seq]` bool, the image pivots and every pivot's least similar tokens. Pivots are visited in
        position order (the reference visits them in the iteration order of a Python ``set`` of their indices,
        which is position order whenever every index is below the set's table size, 32 for 8 pivots); ties in
        norm or similarity go to the earlier token.
    """
    import torch

    seq = candidates.shape[1]
    image_pivots = top_per_sample(norms, candidates, pivot_image)
    pivots = image_pivots | top_per_sample(norms, text, pivot_text)
    pos = torch.arange(seq, device=candidates.device).expand_as(candidates)
    order = torch.where(pivots, pos, seq).sort(dim=1).values[:, : pivot_image + pivot_text]  # seq: no pivot
    kept, remaining = image_pivots, candidates & ~image_pivots
    d = states.shape[-1]
    for p in range(order.shape[1]):  # a fixed, small number of pivots: no host read
        at = order[:, p]
        pivot = states.gather(1, at.clamp(max=seq - 1)[:, None, None].expand(-1, 1, d))  # [batch, 1, d]
        sim = torch.nn.functional.cosine_similarity(pivot, states, dim=-1)  # [batch, seq]
        new = top_per_sample(-sim, remaining, per_pivot) & (at < seq)[:, None]
        kept, remaining = kept | new, remaining & ~new
    return kept


@interventions.register("dart")
class DART(ParametersOnly, Intervention):
    """DART at the shared budget: keep a few pivots and the image tokens least like each (duplicates go).

    DART (Wen et al., 2025): before layer K keep a few pivot image tokens and, for each pivot (image or text),
    the image tokens least like it; duplicates of what is kept go.

    Pivots are the tokens with the largest key L1 norm in layer K-1 (recomputed from that layer's input, with
    rotary, whatever attention implementation runs); similarity is the cosine of layer K-1's outputs through the
    model's final norm. Each of the ``pivot_image + pivot_text`` pivots keeps ``keep // (pivot_image +
    pivot_text)`` tokens, as the reference's ``max_num_trunction``: the image keeps that many plus its image
    pivots (132 for ``keep: 128`` with 4 + 4 pivots; `accounting`). Text pivots are the prompt's tokens after the
    image.

    Args:
        keep: the budget: tokens per image (int) or a fraction of them in (0, 1].
        layer: K: tokens are dropped from layer K on (1..n_layers-1); the reference's ``pruned_layer`` is 2.
        pivot_image: image pivots per image (the reference's default, 4).
        pivot_text: text pivots per image (the reference's default, 4).
        tokens: the tokens of each image DART chooses among (the others always stay).
        per: ``image`` only (one budget per image, a video counting as one): its pivots are chosen image by
            image; ``frame`` is refused by name.

    Example:
        >>> DART(keep=128).accounting(576, 32)["equivalent_tokens"]
        132.0
    """

    def __init__(self, keep: int | float, layer: int = 2, pivot_image: int = 4, pivot_text: int = 4,
                 tokens: SelectionSpec = "visual", per: BudgetPer = "image"):
        self.budget = Budget.parse(keep, "keep", per)
        if per != "image":
            raise InterventionError("per: dart takes its budget per image (a video counting as one): its pivots are "
                                    "chosen image by image; per: frame is not supported")
        self.per = per
        for name, value, low in (("layer", layer, 1), ("pivot_image", pivot_image, 1), ("pivot_text", pivot_text, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InterventionError(f"{name}: expected an integer >= {low}; got {value!r}")
        self.keep, self.layer, self.pivot_image, self.pivot_text, self.tokens = keep, layer, pivot_image, pivot_text, tokens
        self.selection = parse_selection(tokens, "tokens")

    def check(self, adapter) -> None:
        n = adapter.n_llm_layers
        if not 1 <= self.layer <= n - 1:
            raise InterventionError(f"layer: DART prunes before layer K with 1 <= K <= {n - 1}; got {self.layer}")

    def kept_count(self, k: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Tokens an image of `n` keeps at budget `k`: its image pivots, and ``k // pivots`` per pivot."""
        import torch

        per_pivot = torch.div(k, self.pivot_image + self.pivot_text, rounding_mode="floor")
        return torch.minimum(self.pivot_image + (self.pivot_image + self.pivot_text) * per_pivot, n)

    def accounting(self, n_visual: int, n_layers: int) -> dict:
        """The schedule for one image of `n_visual` tokens in an `n_layers`-layer LLM. DART's paper counts the
        tokens kept after layer K (``equivalent_tokens``); the mean over layers is `average_tokens`."""
        import torch

        check_accounting_args(n_visual, n_layers)
        if not 1 <= self.layer <= n_layers - 1:
            raise InterventionError(f"layer: DART prunes before layer K with 1 <= K <= {n_layers - 1}; got {self.layer}")
        n = torch.tensor(n_visual)
        k = self.budget.counts(n)
        m = int(self.kept_count(k, n))
        per_layer = [n_visual] * self.layer + [m] * (n_layers - self.layer)
        pivots = self.pivot_image + self.pivot_text
        rule = (f"DART: all {n_visual} tokens in layers 0..{self.layer - 1}; from layer {self.layer} the "
                f"{self.pivot_image} image pivots plus {int(k) // pivots} per pivot for {pivots} pivots "
                f"(budget // pivots, as the reference's max_num_trunction) = {m}; equivalent = the tokens kept after "
                f"layer {self.layer}, as the paper counts")
        return make_accounting(int(k), per_layer, m, rule)

    def setup(self, ctx: Context) -> None:
        import torch

        self.check(ctx.adapter)
        roles = ctx.roles
        self._candidates = ctx.select(self.selection, within=roles.image_span)
        self._n_images = int(roles.image.max()) + 1 if roles.image.numel() else 0  # one host read per batch
        self._norm = resolve_path(ctx.adapter.model, ctx.adapter.paths.llm_norm)
        self._norms = self._states = None
        seq, home = roles.kind.shape[1], ctx.valid.device

        def read_keys(seen: AttentionInput) -> None:
            keys = attention_keys(seen.module, seen.hidden, seen.position_embeddings)  # [batch, kv_heads, rows, hd]
            norms = keys.float().abs().sum(dim=(1, 3)).to(home).masked_fill(~seen.rows.valid, 0.0)
            self._norms = torch.zeros(norms.shape[0], seq, device=home).scatter(1, seen.rows.index, norms)

        ctx.probe_attention(self.layer - 1, read_keys)

    def after_layer(self, ctx: Context, layer: int, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        import torch

        if layer == self.layer - 1:
            where = next(self._norm.parameters(), hidden).device  # the final norm's own device under a device map
            normed = self._norm(hidden.to(where)).to(hidden.device)
            full = torch.zeros(normed.shape[0], ctx.roles.kind.shape[1], normed.shape[-1], device=normed.device, dtype=normed.dtype)
            self._states = full.scatter(1, rows.index[..., None].expand_as(normed), normed)
        return hidden

    def before_layer(self, ctx: Context, layer: int) -> None:
        import torch

        if layer != self.layer:
            return
        roles = ctx.roles
        present = ctx.present(layer - 1)
        seq = roles.kind.shape[1]
        pos = torch.arange(seq, device=present.device).expand_as(present)
        prompt = present & (pos <= roles.last_index[:, None]) & ~roles.image_span
        kept = torch.zeros_like(present)
        cand_all = self._candidates & present
        for g in range(self._n_images):  # images per sample: read once in setup
            cand = cand_all & (roles.image == g)
            last_of_image = torch.where(roles.image_span & (roles.image == g), pos, -1).max(dim=1).values
            text = prompt & (pos > last_of_image[:, None]) & (last_of_image >= 0)[:, None]
            k = self.budget.counts(cand.sum(dim=1))
            per_pivot = torch.div(k, self.pivot_image + self.pivot_text, rounding_mode="floor")
            kept |= dart_keep(self._norms, self._states, cand, text, per_pivot, self.pivot_image, self.pivot_text)
        drop_from(ctx, cand_all & ~kept, layer)
        self._norms = self._states = None

"""SparseVLM at a token budget (`sparsevlm`): text raters rank the image tokens in a few layers; the dropped
tokens' best part is recycled into a few merged tokens.

Reference: Gumpest/SparseVLMs (Apache-2.0) at 26a5f48, its default version (``USE_VERSION=1_0``, the v1.5
algorithm, with token recycling), ``llava/model/language_model/modelling_sparse_llama.py``:

- raters (lines 198-204): on the LLM's input, ``softmax_text(visual @ text^T)`` averaged over the visual tokens;
  the text tokens after the image above the mean of that are the raters;
- after each of the layers ``pruning_loc = [2, 6, 15]`` (line 70), that layer's own attention (lines 229-243),
  head mean, rater rows, mean over raters (``score.py`` `attn_postprocess_topk`, lines 24-43): the
  ``min(sparse_token_list[stage], v - 1)`` best image tokens are kept (the lists of ``score.py`` lines 10-13 for
  192 / 128 / 96 / 64 of 576);
- recycling (lines 275-307): of the dropped tokens, the ``int(0.3 * dropped) + 1`` best by the same score are
  clustered into ``int(selected / 10) + 1`` tokens (``utils.py`` `cluster_and_merge`, DPC-kNN: density from the
  ``cluster_num`` nearest, distance to the nearest denser token, centres by their product, every token to its
  nearest centre, the mean of each cluster) that join the image tokens of the next stages.
"""

from __future__ import annotations

from collections.abc import Sequence

from embedlens.errors import InterventionError
from embedlens.interventions.base import Intervention, parse_selection
from embedlens.interventions.context import AttentionInput, Context, Rows
from embedlens.interventions.select import SelectionSpec
from embedlens.reduction.budget import Budget, BudgetPer
from embedlens.reduction.inllm import (ParametersOnly, attention_layers_near, check_accounting_args, drop_from, image_sizes,
                                      make_accounting, query_attention, top_per_sample)
from embedlens.registry import interventions

REFERENCE_LAYERS = (2, 6, 15)  # pruning_loc: tokens are dropped after these layers of LLaVA-1.5's 32
REFERENCE_DEPTH, REFERENCE_TOKENS = 32, 576
#: score.py's sparse_token_list (version 1.0): tokens kept at each stage for a budget of 576 tokens
REFERENCE_TABLE = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
RECYCLED_SHARE = 0.3  # "Top 30%" of the dropped tokens are recycled
CLUSTER_SIZE = 10  # into one merged token per 10 of them (plus one)


def stage_layers(n_layers: int, layers: Sequence[int] | None = None) -> list[int]:
    """The layers after which tokens are dropped: `layers`, or the authors' [2, 6, 15] of 32 at the same relative
    depth (``round(l * L / 32)``, strictly increasing within 0..L-2)."""
    if layers is not None:
        if layers[-1] > n_layers - 2:
            raise InterventionError(f"layers: SparseVLM drops after a layer in 0..{n_layers - 2}; got {list(layers)}")
        return list(layers)
    out: list[int] = []
    for layer in REFERENCE_LAYERS:
        v = max(int(round(layer * n_layers / REFERENCE_DEPTH)), out[-1] + 1 if out else 0)
        if v <= n_layers - 2:
            out.append(v)
    return out


def after_stage(v: int, count: int, recycle: bool) -> int:
    """Image tokens after one stage that keeps `count` of `v`: ``min(count, v - 1)`` kept (the reference always
    drops one), plus the merged tokens of the recycled ones."""
    if v == 0:
        return 0
    kept = min(count, v - 1)
    if not recycle:
        return kept
    selected = int((v - kept) * RECYCLED_SHARE) + 1
    return kept + selected // CLUSTER_SIZE + 1


def paper_counts(n: int, counts: Sequence[int], layers: Sequence[int], n_layers: int, recycle: bool) -> tuple[list[int], list[int]]:
    """(image tokens each layer computes on, the reference's logged count per layer). The reference logs, for each
    layer, the count after that layer's own drop (its ``num_token.append(v_token_num)``, "Equal Tokens")."""
    v, after = n, []
    for count in counts:
        v = after_stage(v, count, recycle)
        after.append(v)
    logged, computed = [], []
    for layer in range(n_layers):
        done = [a for a, lay in zip(after, layers) if lay <= layer]
        before = [a for a, lay in zip(after, layers) if lay < layer]
        logged.append(done[-1] if done else n)
        computed.append(before[-1] if before else n)
    return computed, logged


def sparsevlm_schedule(n: int, k: int, n_layers: int, layers: Sequence[int], recycle: bool = True,
                       reference_layers: bool = True) -> tuple[int, ...]:
    """Tokens kept at each stage for an image of `n` tokens at budget `k`.

    The authors' table for 576 tokens, 32 layers and their layers where it has the budget (192, 128, 96, 64).
    Otherwise the table row nearest in ``k / n`` gives the stages' shares of `n`, scaled by the largest factor
    whose logged mean (the paper's "Equal Tokens", recycled tokens included) does not pass `k`; a budget that even
    one token per stage passes keeps one per stage.
    """
    if n == REFERENCE_TOKENS and n_layers == REFERENCE_DEPTH and reference_layers and k in REFERENCE_TABLE and recycle:
        return REFERENCE_TABLE[k][: len(layers)]
    ratio = k * REFERENCE_TOKENS / n
    row = REFERENCE_TABLE[min(REFERENCE_TABLE, key=lambda key: (abs(key - ratio), key))][: len(layers)]
    shares = [c / REFERENCE_TOKENS for c in row]

    def counts(alpha: float) -> tuple[int, ...]:
        return tuple(max(1, min(n, int(alpha * s * n))) for s in shares)

    def mean(alpha: float) -> float:
        return sum(paper_counts(n, counts(alpha), layers, n_layers, recycle)[1]) / n_layers

    lo, hi = 0.0, 1.0 / min(shares)
    for _ in range(50):  # host arithmetic, once per image size and batch
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) <= k else (lo, mid)
    return counts(lo)


def rater_mask(embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters: the `text` tokens whose mean (over the `visual` tokens) share of the visual tokens'
    softmax over the text is above that mean's average over the text (in float32).

    Args:
        embeds: `[batch, seq, d]` the LLM's input.
        visual, text: `[batch, seq]` bool.
    """
    e = embeds.float()
    logits = (e @ e.transpose(1, 2)).masked_fill(~text[:, None, :], float("-inf"))  # [batch, visual q, text k]
    share = logits.softmax(dim=-1).nan_to_num(0.0)
    m = (share * visual[..., None]).sum(dim=1) / visual.sum(dim=1).clamp(min=1)[:, None]  # [batch, seq]
    mean = (m * text).sum(dim=1) / text.sum(dim=1).clamp(min=1)
    return text & (m > mean[:, None])


def dpc_knn_merge(x: torch.Tensor, valid: torch.Tensor, clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM's recycling (`cluster_and_merge`, DPC-kNN), per row, over the `valid` tokens of each row.

    Args:
        x: `[rows, width, d]` the tokens to merge, packed left.
        valid: `[rows, width]` bool.
        clusters: `[rows]` long, merged tokens per row (1 <= clusters <= valid count, or 0 for an empty row).

    Returns:
        `(centres, merged)`: `[rows, width]` bool, the token of each cluster that becomes its merged token, and
        `[rows, width, d]` the cluster means at the centres (x elsewhere). The reference adds noise of 1e-6 to the
        densities to break their ties; here ties go to the earlier token.
    """
    import torch

    rows, width, d = x.shape
    xf = x.float()
    inf = float("inf")
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / d**0.5  # [rows, width, width]
    pair = valid[:, :, None] & valid[:, None, :]
    nearest = dist.masked_fill(~valid[:, None, :], inf).sort(dim=-1).values
    first = torch.arange(width, device=x.device)[None, None, :] < clusters[:, None, None]
    c = clusters.clamp(min=1).double()[:, None]
    density = torch.exp(-(nearest.masked_fill(~first, 0.0).double() ** 2).sum(dim=-1) / c).float()
    denser = (density[:, None, :] > density[:, :, None]) & pair
    dist_max = dist.masked_fill(~pair, -inf).flatten(1).max(dim=1).values
    parent = torch.where(denser, dist, dist_max[:, None, None]).masked_fill(~valid[:, None, :], inf).min(dim=-1).values
    score = (parent * density).masked_fill(~valid, float("-inf"))
    centres = top_per_sample(score, valid, clusters)
    owner = dist.masked_fill(~centres[:, None, :], inf).argmin(dim=-1)  # the nearest centre, the earlier on ties
    owner = torch.where(centres, torch.arange(width, device=x.device).expand(rows, -1), owner)
    weight = valid.float()
    sums = torch.zeros_like(xf).scatter_add(1, owner[..., None].expand(-1, -1, d), xf * weight[..., None])
    count = torch.zeros(rows, width, device=x.device).scatter_add(1, owner, weight)
    merged = (sums / (count + 1e-6)[..., None]).to(x.dtype)  # as the reference: x / (count + 1e-6), summed
    return centres, torch.where(centres[..., None], merged, x)


@interventions.register("sparsevlm")
class SparseVLM(ParametersOnly, Intervention):
    """SparseVLM at the shared budget: text raters rank image tokens in a few layers; dropped ones are recycled.

    SparseVLM (Zhang et al., 2025): after a few layers the best image tokens by the raters' attention are kept
    and the best of the rest are recycled into merged tokens.

    Raters are chosen once on the LLM's input; after each stage layer, that layer's attention from the raters'
    rows only (recomputed, whatever attention implementation runs) ranks the image tokens present. A merged
    token takes the place (and position id) of its cluster's centre; the reference (version 1.0) instead puts
    the merged tokens after the kept image tokens and renumbers every position id after each stage. The stage
    counts follow the authors' table where it has the budget, else a scaled row of it (`sparsevlm_schedule`).
    Ties in the raters' score keep the earlier token (the reference's ``topk`` leaves them to the kernel), and
    ties in the clustering's densities go to the earlier token instead of the reference's 1e-6 random noise.

    Args:
        keep: the budget: tokens per image (int) or a fraction of them in (0, 1].
        layers: the layers after which tokens are dropped (strictly increasing, 0..n_layers-2); by default the
            authors' [2, 6, 15] of 32 at the same relative depth (on a hybrid model such as Qwen3.5, moved to
            the nearest attention layers, `attention_layers_near`; a linear-attention layer given here is refused
            by name).
        recycle: merge the best dropped tokens back (the reference's default) or only drop.
        tokens: the tokens of each image ranked (the others always stay).
        per: ``image`` only (one budget per image, a video counting as one): its raters, stages and recycled
            clusters are per image; ``frame`` is refused by name.

    Example:
        >>> SparseVLM(keep=64).accounting(576, 32)["tokens_per_layer"][3]
        82
    """

    def __init__(self, keep: int | float, layers: list[int] | None = None, recycle: bool = True,
                 tokens: SelectionSpec = "visual", per: BudgetPer = "image"):
        self.budget = Budget.parse(keep, "keep", per)
        if per != "image":
            raise InterventionError("per: sparsevlm takes its budget per image (a video counting as one): its stages and "
                                    "recycled clusters run image by image; per: frame is not supported")
        self.per = per
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not layers or any(isinstance(v, bool) or not isinstance(v, int) for v in layers):
                raise InterventionError(f"layers: expected a non-empty list of layer indices; got {layers!r}")
            if layers[0] < 0 or any(b <= a for a, b in zip(layers, layers[1:])):
                raise InterventionError(f"layers: must be >= 0 and strictly increasing; got {list(layers)}")
            if len(layers) > len(REFERENCE_LAYERS):
                raise InterventionError(f"layers: SparseVLM has at most {len(REFERENCE_LAYERS)} stages (the authors' "
                                        f"table has {len(REFERENCE_LAYERS)}); got {list(layers)}")
        if not isinstance(recycle, bool):
            raise InterventionError(f"recycle: expected true or false; got {recycle!r}")
        self.keep, self.layers, self.recycle, self.tokens = keep, layers, recycle, tokens
        self.selection = parse_selection(tokens, "tokens")

    def check(self, adapter) -> None:
        stage_layers(adapter.n_llm_layers, self.layers)

    def schedule(self, n_visual: int, n_layers: int, layers: Sequence[int] | None = None) -> tuple[int, ...]:
        """The tokens kept after each stage layer (`layers`: the run's, default `stage_layers`)."""
        import torch

        layers = stage_layers(n_layers, self.layers) if layers is None else layers
        k = int(self.budget.counts(torch.tensor(n_visual)))
        return sparsevlm_schedule(n_visual, k, n_layers, layers, self.recycle, self.layers is None)

    def accounting(self, n_visual: int, n_layers: int) -> dict:
        """The stages for one image of `n_visual` tokens in an `n_layers`-layer LLM. The paper's count (the
        reference's logged "Equal Tokens") is the mean over layers of the tokens after each layer's own drop,
        merged tokens included; `average_tokens` is the mean of what each layer computes on."""
        import torch

        check_accounting_args(n_visual, n_layers)
        layers = stage_layers(n_layers, self.layers)
        counts = self.schedule(n_visual, n_layers)
        computed, logged = paper_counts(n_visual, counts, layers, n_layers, self.recycle)
        k = int(self.budget.counts(torch.tensor(n_visual)))
        rule = (f"SparseVLM: drops after layers {layers}, keeping {list(counts)} (min(count, v - 1)) "
                + ("plus int((int(0.3 * dropped) + 1) / 10) + 1 merged tokens per stage; " if self.recycle else "; ")
                + "equivalent = the mean over layers of the tokens after each layer's own drop, as the reference logs it")
        return make_accounting(k, computed, sum(logged) / n_layers, rule)

    def setup(self, ctx: Context) -> None:
        import torch

        roles = ctx.roles
        self._layers = stage_layers(ctx.n_layers, self.layers)
        if self.layers is None:  # on a hybrid model the default layers rank at attention layers
            self._layers = attention_layers_near(self._layers, ctx.adapter, 0, ctx.n_layers - 2)
        self._candidates = ctx.select(self.selection, within=roles.image_span)
        seq, home = roles.kind.shape[1], ctx.valid.device
        # once per batch on the host: the images' sizes (for the stages' counts), the raters' number
        n0 = image_sizes(self._candidates, roles.image)
        n0[:, -1] = 0
        n0_host = n0.cpu()
        self._n_images = int((roles.image.max() + 1).clamp(min=0))
        table = torch.zeros(*n0_host.shape, len(self._layers), dtype=torch.long)
        cache: dict[int, tuple[int, ...]] = {}
        for b, g in (n0_host > 0).nonzero().tolist():
            n = int(n0_host[b, g])
            if n not in cache:
                cache[n] = self.schedule(n, ctx.n_layers, self._layers)
            table[b, g] = torch.tensor(cache[n])
        self._counts = table.to(home)
        self._width = int(int(n0_host.max()) * RECYCLED_SHARE) + 1

        pos = torch.arange(seq, device=home).expand_as(self._candidates)
        first_image = torch.where(roles.image_span, pos, seq).min(dim=1).values
        text = ctx.valid & ~roles.image_span & (pos > first_image[:, None]) & (pos <= roles.last_index[:, None])
        raters = rater_mask(ctx.embeds, self._candidates, text)
        n_raters = int(raters.sum(dim=1).max())
        order = torch.where(raters, pos, seq).sort(dim=1).values[:, : max(n_raters, 1)]
        self._rater_valid = order < seq
        queries = torch.where(self._rater_valid, order, roles.last_index[:, None])
        self._relation: dict[int, torch.Tensor] = {}

        for layer in self._layers:
            def read(seen: AttentionInput, layer: int = layer) -> None:
                att = query_attention(seen, queries, seq, home).mean(dim=1)  # [batch, raters, seq]
                w = self._rater_valid.float()
                self._relation[layer] = (att * w[..., None]).sum(dim=1) / w.sum(dim=1).clamp(min=1)[:, None]

            ctx.probe_attention(layer, read)

    def after_layer(self, ctx: Context, layer: int, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        import torch

        if layer not in self._relation:
            return hidden
        roles = ctx.roles
        stage = self._layers.index(layer)
        score = self._relation.pop(layer)
        cand = self._candidates & ctx.present(layer)
        stage_counts = self._counts[..., stage]
        keep = Budget(1).keep_mask(score, cand, roles.image,
                                   counts=lambda n: torch.minimum(stage_counts, n - 1).clamp(min=0))
        dropped = cand & ~keep
        if self.recycle:
            hidden, centres = self._recycle(ctx, hidden, rows, score, dropped)
            keep = keep | centres
        drop_from(ctx, cand & ~keep, layer + 1)
        return hidden

    def _recycle(self, ctx: Context, hidden: torch.Tensor, rows: Rows, score: torch.Tensor, dropped: torch.Tensor):
        """Merge the best dropped tokens of each image into a few: `(hidden, centres)` with the merged tokens
        written at their centres' rows and `[batch, seq]` bool the centres (kept as the merged tokens)."""
        import torch

        roles = ctx.roles
        batch, seq = dropped.shape
        n_dropped = image_sizes(dropped, roles.image)
        n_sel = torch.where(n_dropped > 0, (n_dropped.double() * RECYCLED_SHARE).floor().long() + 1, 0)
        n_sel[:, -1] = 0
        selected = Budget(1).keep_mask(score, dropped, roles.image, counts=lambda n: n_sel)
        clusters = torch.where(n_sel > 0, n_sel // CLUSTER_SIZE + 1, 0)
        full = torch.zeros(batch, seq, hidden.shape[-1], device=hidden.device, dtype=hidden.dtype)
        full = full.scatter(1, rows.index[..., None].expand_as(hidden), hidden)
        pos = torch.arange(seq, device=dropped.device).expand_as(dropped)
        centres = torch.zeros_like(dropped)
        pad = torch.zeros(batch, 1, full.shape[-1], device=full.device, dtype=full.dtype)
        for g in range(self._n_images):  # images per sample: read once in setup
            order = torch.where(selected & (roles.image == g), pos, seq).sort(dim=1).values[:, : self._width]
            valid = order < seq
            x = full.gather(1, order.clamp(max=seq - 1)[..., None].expand(-1, -1, full.shape[-1]))
            is_centre, merged = dpc_knn_merge(x, valid, clusters[:, g])
            # centres write their merged token; every other entry writes to a spare column past the sequence
            at = torch.where(is_centre & valid, order, seq)
            full = torch.cat([full, pad], dim=1).scatter(1, at[..., None].expand_as(merged), merged)[:, :seq]
            centres = centres | torch.zeros(batch, seq + 1, dtype=torch.bool, device=at.device).scatter(1, at, True)[:, :seq]
        return torch.where(rows.gather(centres)[..., None], rows.gather(full), hidden), centres

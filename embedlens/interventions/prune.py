"""Removing image tokens: `prune`, its matched random control, and FastV."""

from __future__ import annotations

import math
import zlib
from typing import Literal

from embedlens.attention import LINEAR, llm_layer_types
from embedlens.errors import InterventionError
from embedlens.interventions.base import IfEmpty, Intervention, parse_selection, require_nonempty
from embedlens.interventions.context import Context
from embedlens.interventions.select import SelectionSpec
from embedlens.registry import interventions

PruneMode = Literal["remove", "mask"]


class _Pruning(Intervention):
    """Shared by prune and its control: drop `self._chosen` tokens from every layer."""

    mode: PruneMode = "remove"
    _chosen: torch.Tensor | None = None

    def _apply(self, ctx: Context, chosen: torch.Tensor) -> None:
        import torch

        self._chosen = chosen
        if self.mode == "remove":
            ctx.exit = torch.where(chosen, torch.zeros_like(ctx.exit), ctx.exit)

    def blocked(self, ctx: Context, layer: int):
        if self.mode == "mask":
            return ctx.valid, self._chosen
        return None


@interventions.register("prune")
class Prune(_Pruning):
    """Remove image tokens from the sequence before the first LLM layer.

    Kept tokens keep their original position ids and decoding continues from
    the unpruned length; text is never touched (the selection is restricted to
    image tokens). ``mode: mask`` keeps the tokens but blocks every query from
    attending to them: the same outputs without the saving, as a check.

    Args:
        tokens: the image tokens to remove (a selection: ``dead``, ``visual and row < 12``, indices, ...).
        mode: ``remove`` (drop them from the sequence; saves compute) or ``mask`` (block attention to
            them; same outputs).
        if_empty: ``error`` (the default) when some sample's selection is empty, or ``noop`` to leave such
            samples unchanged.

    Example:
        >>> Prune(tokens="dead")
        Prune(tokens='dead', mode='remove', if_empty='error')

        In a plan::

            conditions:
              prune_dead: [{name: prune, params: {tokens: dead}}]
    """

    def __init__(self, tokens: SelectionSpec, mode: PruneMode = "remove", if_empty: IfEmpty = "error"):
        if mode not in ("remove", "mask"):
            raise InterventionError(f"mode: must be 'remove' or 'mask'; got {mode!r}")
        self.tokens, self.mode, self.if_empty = tokens, mode, if_empty
        self.selection = parse_selection(tokens, "tokens")

    def setup(self, ctx: Context) -> None:
        chosen = ctx.select(self.selection, within=ctx.roles.image_span)
        require_nonempty(ctx, chosen, "tokens", self.tokens, self.if_empty, what="image")
        self._apply(ctx, chosen)


def sample_seed(seed: int, sample_id: str, ids: torch.Tensor) -> int:
    """A per-sample seed that does not depend on batching: the run's seed, the
    sample's id and its tokens."""
    return zlib.crc32(f"{seed}:{sample_id}:".encode() + ids.cpu().numpy().tobytes())


@interventions.register("prune_random_matched")
class PruneRandomMatched(_Pruning):
    """Matched random control for `prune`: remove as many tokens as `target` has, drawn from the rest.

    The tokens are drawn at random (seeded per sample) from the `pool` tokens
    outside the target (from the whole pool with ``exclude_target: false``,
    for when the target is more than half of the pool).

    A sample whose target is empty is an error, or unchanged with
    ``if_empty: noop``; never "remove everything". The draw depends only on
    the seed, the sample's id and its tokens, not on how samples are batched.

    Args:
        target: the selection whose size is matched per sample (e.g. ``dead``).
        seed: seeds the per-sample draw (with the sample id and its tokens).
        pool: the tokens the draw is made from.
        mode: ``remove`` or ``mask``, as `prune`.
        if_empty: ``error`` (the default) when some sample's selection is empty, or ``noop`` to leave such
            samples unchanged.
        exclude_target: draw from the pool outside the target (``false``: from the whole pool, for a target that
            is most of it).
        per_frame: match the count frame by frame (a video's tokens: as many from each frame as the target has
            there, drawn from that frame's pool); image tokens are one frame (-1).

    Example:
        >>> PruneRandomMatched(target="dead", seed=1).seed
        1
    """

    def __init__(
        self,
        target: SelectionSpec,
        seed: int = 0,
        pool: SelectionSpec = "visual",
        mode: PruneMode = "remove",
        if_empty: IfEmpty = "error",
        exclude_target: bool = True,
        per_frame: bool = False,
    ):
        if mode not in ("remove", "mask"):
            raise InterventionError(f"mode: must be 'remove' or 'mask'; got {mode!r}")
        self.target, self.seed, self.pool, self.mode, self.if_empty = target, seed, pool, mode, if_empty
        self.exclude_target, self.per_frame = exclude_target, per_frame
        self.target_sel = parse_selection(target, "target")
        self.pool_sel = parse_selection(pool, "pool")

    def setup(self, ctx: Context) -> None:
        chosen = draw_matched(ctx, self.target_sel, self.target, self.pool_sel, self.pool, self.seed, self.if_empty,
                              self.exclude_target, self.per_frame)
        self._apply(ctx, chosen)


def draw_matched(
    ctx: Context, target_sel, target_spec, pool_sel, pool_spec, seed: int, if_empty: IfEmpty, exclude_target: bool = True,
    per_frame: bool = False,
) -> torch.Tensor:
    """Per sample, as many tokens as the target has, drawn at random from the pool (outside the target unless
    `exclude_target` is False). Seeded by the run seed, the sample id and its tokens, so batching does not matter.
    With `per_frame`, the count is matched in each frame of a video (`TokenRoles.frame`), drawn from that frame's
    pool, one frame after another from the same generator."""
    import torch

    image = ctx.roles.image_span
    target = ctx.select(target_sel, within=image)
    require_nonempty(ctx, target, "target", target_spec, if_empty, what="image")
    pool = ctx.select(pool_sel, within=image)
    if exclude_target:
        pool = pool & ~target
    # The draw is made on the host with a CPU generator seeded from the plan's seed, the sample id and its tokens,
    # so it picks the same tokens whatever device the model runs on; the masks cross once each way.
    target_h, pool_h = torch.stack([target, pool]).cpu()
    chosen = torch.zeros_like(target_h)
    ids, padding, frame = ctx.batch.input_ids.cpu(), ctx.batch.roles.padding.cpu(), ctx.batch.roles.frame.cpu()
    for b, sample in enumerate(ctx.batch.samples):
        if not target_h[b].any():
            continue
        gen = torch.Generator().manual_seed(sample_seed(seed, sample.id, ids[b][~padding[b]]))
        groups = frame[b][target_h[b]].unique().tolist() if per_frame else [None]
        for f in groups:  # per_frame: each frame the target touches, in order; else the whole sample at once
            in_f = torch.ones_like(target_h[b]) if f is None else frame[b] == f
            n = int((target_h[b] & in_f).sum())
            candidates = (pool_h[b] & in_f).nonzero().flatten()
            if len(candidates) < n:
                where = (" outside the target" if exclude_target else "") + ("" if f is None else f" in frame {f}")
                hint = " (exclude_target: false draws from the whole pool)" if exclude_target else ""
                raise InterventionError(
                    f"target: sample {sample.id!r} has {n} target tokens{'' if f is None else f' in frame {f}'} but only "
                    f"{len(candidates)} pool tokens ({pool_spec!r}){where} to draw from{hint}"
                )
            pick = torch.randperm(len(candidates), generator=gen)[:n]
            chosen[b, candidates[pick]] = True
    return chosen.to(target.device)


@interventions.register("fastv")
class FastV(Intervention):
    """FastV: after layer K, keep the fraction of image tokens the last prompt token attends to most.

    Attention is the head average in layer K-1.

    The attention row is recomputed from layer K-1's queries and keys, so this
    works with SDPA; tokens dropped are absent from layer K on.

    Args:
        layer: K: tokens are ranked by layer K-1's last-token attention and dropped from layer K on
            (1..n_layers-1).
        keep: fraction of the `tokens` kept, in (0, 1].
        tokens: the tokens ranked (the others always stay).

    Example:
        >>> FastV(layer=2, keep=0.5).keep
        0.5
    """

    def __init__(self, layer: int = 2, keep: float = 0.5, tokens: SelectionSpec = "visual"):
        if not 0.0 < keep <= 1.0:
            raise InterventionError(f"keep: must be a fraction in (0, 1]; got {keep!r}")
        self.layer, self.keep, self.tokens = layer, keep, tokens
        self.selection = parse_selection(tokens, "tokens")

    def check(self, adapter) -> None:
        n = adapter.n_llm_layers
        if not 1 <= self.layer <= n - 1:
            raise InterventionError(f"layer: FastV prunes after layer K with 1 <= K <= {n - 1}; got {self.layer}")
        # FastV ranks by the attention of layer K - 1, which a linear-attention layer does not have
        types = llm_layer_types(adapter)
        if types[self.layer - 1] == LINEAR:
            ok = [i + 1 for i, t in enumerate(types[:-1]) if t != LINEAR]
            raise InterventionError(
                f"layer: FastV at K = {self.layer} ranks by the attention of decoder layer {self.layer - 1}, a "
                f"linear-attention (Gated DeltaNet) layer with no attention matrix; K may be "
                f"{', '.join(map(str, ok)) or '(none)'} (after an attention layer)")

    def accounting(self, n_visual: int, n_layers: int) -> dict:
        """The schedule for one image of `n_visual` tokens in an `n_layers`-layer LLM (as the token-reduction
        methods of `embedlens.reduction` state theirs): all tokens up to layer K-1, ``ceil(n * keep)`` from K on;
        the equivalent count is the mean over layers. `fastv_budget` sets K and R from a token budget instead."""
        from embedlens.reduction.inllm import check_accounting_args, make_accounting

        check_accounting_args(n_visual, n_layers)
        m = math.ceil(n_visual * self.keep)  # in float64, as `before_layer` counts
        per_layer = [n_visual] * self.layer + [m] * (n_layers - self.layer)
        rule = (f"FastV: all {n_visual} tokens in layers 0..{self.layer - 1}, ceil({n_visual} * {self.keep}) = {m} from "
                f"layer {self.layer}; equivalent = the mean over layers")
        return make_accounting(m, per_layer, sum(per_layer) / n_layers, rule)

    def setup(self, ctx: Context) -> None:
        self.check(ctx.adapter)
        self._candidates = ctx.select(self.selection, within=ctx.roles.image_span)
        ctx.request_last_attention(self.layer - 1)

    def before_layer(self, ctx: Context, layer: int) -> None:
        import torch

        if layer != self.layer:
            return
        att = ctx.attention[layer - 1].mean(dim=1)  # [batch, seq]
        cand = self._candidates & ctx.present(layer - 1)
        n = cand.sum(dim=1)
        n_drop = n - (n.double() * self.keep).ceil().long()  # math.ceil(n * keep), in the same float64
        # lowest attention first; ties broken by position (a stable sort), so the result is deterministic
        order = torch.argsort(att.masked_fill(~cand, float("inf")), dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        drop = cand & (rank < n_drop[:, None])  # all on the device: the engine's layer loop never waits here
        ctx.exit = torch.where(drop, torch.minimum(ctx.exit, torch.full_like(ctx.exit, layer)), ctx.exit)

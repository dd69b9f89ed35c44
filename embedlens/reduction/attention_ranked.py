"""Methods that rank patches by the tower's [CLS] attention: FasterVLM, VisionZip, VisPruner.

Each has a pure selection function on `[batch, seq]` tensors (per image, on the
device) and an intervention around it. The criteria come from
`embedlens.reduction.vision.read_tower`; the tie rule is the budget's (higher
score first, then the earlier position) where the references leave ties to
``torch.topk`` / ``argsort``, whose order on ties is unspecified.
"""

from __future__ import annotations

from embedlens.adapters.base import resolve_path
from embedlens.errors import InterventionError
from embedlens.interventions.context import Context
from embedlens.interventions.select import SelectionSpec
from embedlens.reduction._rank import group_sizes, image_groups, ranks
from embedlens.reduction.base import InputReduction
from embedlens.reduction.budget import Budget, BudgetPer
from embedlens.reduction.vision import check_tower, read_tower
from embedlens.registry import interventions


def _per_token(per_group: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return per_group.gather(1, group)


def visionzip_select(
    cls: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor, image: torch.Tensor, budget: Budget, contextual: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's choice: dominant tokens by [CLS] attention, the rest merged into evenly spaced contextual tokens.

    Per image of ``n`` candidates and a budget of ``k < n``: ``c = floor(k * contextual)`` contextual tokens and
    ``k - c`` dominant ones (the highest `cls`). The other ``n - k + c`` tokens, in position order, are the
    remainder: every ``step = max(1, R // c)``-th of them (the first ``c``) is a contextual target, and each other
    remainder token is merged into the target whose key is most similar (cosine; the first target on ties, as
    ``argmax``). Reference: VisionZip ``visionzip/clip_encoder.py`` lines 55-90.

    Args:
        cls: `[batch, seq]` [CLS] attention; keys: `[batch, seq, d]` the layer's head-mean keys.
        candidates, image: as `Budget.keep_mask`.

    Returns:
        ``(kept, targets, into)``: `[batch, seq]` bool (dominant + contextual targets), `[batch, seq]` bool (the
        contextual targets), and `[batch, seq]` long: for each merged token the position of its target, -1 for the
        others.
    """
    import torch
    import torch.nn.functional as F

    group = image_groups(candidates, image)
    n = group_sizes(group)
    k = budget.counts(n)
    k[:, -1] = 0
    ctx_n = torch.where(k < n, (k.double() * contextual).floor().long(), torch.zeros_like(k))
    dominant = (ranks([-cls], candidates, image) < _per_token(k - ctx_n, group)) & candidates
    rest = candidates & ~dominant
    r_n = group_sizes(image_groups(rest, image))
    rank = ranks([], rest, image)  # position order within each image's remainder
    step = torch.clamp(r_n // ctx_n.clamp(min=1), min=1)
    rest_group = image_groups(rest, image)
    t_step, t_ctx = _per_token(step, rest_group), _per_token(ctx_n, rest_group)
    target = rest & (rank % t_step == 0) & (rank // t_step < t_ctx)
    merged = rest & ~target & (t_ctx > 0)
    kn = F.normalize(keys.float(), dim=-1)
    sim = kn @ kn.transpose(1, 2)  # [batch, seq, seq]
    same = (image[:, :, None] == image[:, None, :]) & target[:, None, :]
    best = sim.masked_fill(~same, float("-inf")).argmax(dim=-1)  # first maximum: the earliest target
    into = torch.where(merged, best, torch.full_like(best, -1))
    return dominant | target, target, into


def visionzip_merge(features: torch.Tensor, into: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`[batch, seq, d]`: each target's feature plus the mean of the features merged into it (VisionZip's
    ``target_hidden + aggregated_hidden``, the count clamped to 1); other rows unchanged."""
    import torch

    batch, seq, d = features.shape
    src = into.clamp(min=0)
    w = (into >= 0).to(features.dtype)[..., None]
    total = torch.zeros_like(features).scatter_add_(1, src[..., None].expand(-1, -1, d), features * w)
    count = torch.zeros(batch, seq, 1, dtype=features.dtype, device=features.device).scatter_add_(1, src[..., None], w)
    return torch.where(targets[..., None], features + total / count.clamp(min=1), features)


def vispruner_select(
    cls: torch.Tensor, features: torch.Tensor, candidates: torch.Tensor, image: torch.Tensor, budget: Budget,
    important_ratio: float, chunk: int = 8,
) -> torch.Tensor:
    """VisPruner's choice: ``int(k * important_ratio)`` important tokens by [CLS] attention, then diverse ones.

    The remainder, ordered by [CLS] attention (highest first), is thinned until ``k`` tokens are left in all: each
    round splits it into alternate halves A (even places) and B (odd places), scores each A token by its highest
    cosine similarity to a B token, and drops the ``min(chunk, R - d)`` most similar A tokens; the next order is
    the kept A tokens by that score (highest first) then B in its order. Reference: VisPruner
    ``llava/model/llava_arch.py`` lines 147-185. Ties (equal similarities) go to the earlier place in the order.

    Returns:
        `[batch, seq]` bool, the kept tokens.
    """
    import torch
    import torch.nn.functional as F

    batch, seq = candidates.shape
    group = image_groups(candidates, image)
    n = group_sizes(group)
    k = budget.counts(n)
    k[:, -1] = 0
    n_imp = (k.double() * important_ratio).floor().long()  # int(T * r)
    n_div = k - n_imp
    rank = ranks([-cls], candidates, image)
    important = candidates & (rank < _per_token(n_imp, group))
    rest = candidates & ~important & (_per_token(n_div, group) > 0)  # no diverse share: the reference skips the rounds
    order = torch.where(rest, rank - _per_token(n_imp, group), torch.zeros_like(rank))  # place in the remainder
    fn = F.normalize(features.float(), dim=-1)
    sim = fn @ fn.transpose(1, 2)
    same = image[:, :, None] == image[:, None, :]
    # rounds: each drops up to `chunk` per image (fewer once fewer remain); a static bound, so no host read
    for _ in range(seq // chunk + seq.bit_length() + 1):
        r_n = group_sizes(image_groups(rest, image))
        # min(chunk, R - d) as the reference; also at most |A| = ceil(R / 2), which the reference's budgets never exceed
        r = torch.minimum(torch.minimum(torch.full_like(r_n, chunk), r_n - n_div), (r_n + 1) // 2).clamp(min=0)
        t_r = _per_token(r, group)
        is_a, is_b = rest & (order % 2 == 0), rest & (order % 2 == 1)
        score = sim.masked_fill(~(same & is_b[:, None, :]), float("-inf")).amax(dim=-1)
        a_rank = ranks([-score, order], is_a, image)  # highest similarity first; ties: earlier place
        drop = is_a & (a_rank < t_r)
        kept_a = is_a & ~drop
        n_kept_a = _per_token(group_sizes(image_groups(kept_a, image)), group)
        order = torch.where(kept_a, a_rank - t_r, torch.where(is_b, n_kept_a + order // 2, order))
        rest = rest & ~drop
    return important | rest


def _vision_reduction_check(self, adapter) -> None:
    check_tower(adapter, self.registered_name or type(self).__name__)


@interventions.register("fastervlm")
class FasterVLM(InputReduction):
    """FasterVLM: keep the image tokens the vision tower's [CLS] token attends to most, before the LLM.

    Scores are the head-averaged [CLS] attention at the tower layer the model takes its features from (LLaVA-1.5:
    ``attentions[-2]``), recomputed for that one row; a SigLIP tower (no [CLS]) uses the mean attention each patch
    receives. Reference: FasterVLM ``llava/model/llava_arch.py`` lines 141-157 (``topk`` of the head mean).

    Args:
        keep: tokens kept per image (an int), or a fraction of them in (0, 1] (rounded up).
        tokens: the image tokens the budget is taken from.
        per: ``image`` (one budget per image, a video counting as one) or ``frame`` (one per frame of a video).

    Example:
        >>> FasterVLM(keep=64).keep
        64
    """

    def __init__(self, keep: int | float = 64, tokens: SelectionSpec = "visual", per: BudgetPer = "image"):
        self._init_budget(keep, tokens, per)

    check = _vision_reduction_check

    def choose(self, ctx: Context, candidates: torch.Tensor) -> torch.Tensor:
        read = read_tower(ctx.adapter, ctx.batch, candidates)
        return self.budget.keep_mask(read.attention, candidates, self.groups(ctx))


@interventions.register("visionzip")
class VisionZip(InputReduction):
    """VisionZip: dominant tokens by [CLS] attention, plus contextual tokens that merge the rest.

    Of a budget of ``k`` tokens per image, ``floor(k * contextual)`` are contextual (VisionZip's 54 + 10 = 64,
    108 + 20, 162 + 30 with the default 0.15625) and the rest dominant. Each contextual token replaces its target's
    LLM input by the projector applied to the target's feature plus the mean feature of the tokens merged into it
    (merged in the tower's feature space, before the projector, as the reference does). Keys of the same layer
    decide the merge. A SigLIP tower (no [CLS]) ranks by the mean attention each patch receives
    (`embedlens.reduction.vision`). The reference also keeps the tower's [CLS] token as one of its dominant tokens; LLaVA-1.5
    drops [CLS] from its visual tokens, so here every kept token is a patch. On anyres models (LLaVA-NeXT) the
    reference gives every tile the same budget and drops the newline tokens; here the budget is per image, its
    tiles' tokens ranked together (each by its own tile's [CLS] row), and newline tokens stay (not candidates).
    Merged tokens sit at their target's position, as every kept token keeps its own (the reference appends them
    after the dominant tokens and renumbers). Reference: VisionZip ``visionzip/clip_encoder.py`` lines 55-90,
    ``visionzip/llava_arch.py`` lines 42-80 (anyres).

    Args:
        keep: tokens kept per image (an int), or a fraction of them in (0, 1] (rounded up).
        contextual: the share of the budget given to contextual (merged) tokens, in [0, 1).
        tokens: the image tokens the budget is taken from.
        per: ``image`` (one budget per image, a video counting as one) or ``frame`` (one per frame of a video).

    Example:
        >>> VisionZip(keep=64).contextual
        0.15625
    """

    def __init__(self, keep: int | float = 64, contextual: float = 0.15625, tokens: SelectionSpec = "visual", per: BudgetPer = "image"):
        if isinstance(contextual, bool) or not isinstance(contextual, (int, float)) or not 0.0 <= contextual < 1.0:
            raise InterventionError(f"contextual: expected a share of the budget in [0, 1); got {contextual!r}")
        self._init_budget(keep, tokens, per)
        self.contextual = float(contextual)
        self._merged: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None

    check = _vision_reduction_check

    def state_dict(self) -> dict:
        """The parameters only: the last batch's merged tokens are rebuilt by every batch, never checkpointed."""
        return {k: v for k, v in vars(self).items() if k not in ("_merged", "_targets")}

    def choose(self, ctx: Context, candidates: torch.Tensor) -> torch.Tensor:
        import torch

        read = read_tower(ctx.adapter, ctx.batch, candidates, features=True, keys=True)
        kept, targets, into = visionzip_select(read.attention, read.keys, candidates, self.groups(ctx), self.budget, self.contextual)
        merged = visionzip_merge(read.features, into, targets)
        projector = resolve_path(ctx.adapter.model, ctx.adapter.paths.projector)
        with torch.no_grad():
            self._merged = projector(merged, *ctx.adapter.projector_args(ctx.batch.inputs))
        self._targets = targets
        return kept

    def edit_embeds(self, ctx: Context, embeds: torch.Tensor) -> torch.Tensor:
        import torch

        if self._targets is None:
            return embeds
        return torch.where(self._targets[..., None], self._merged.to(embeds), embeds)


@interventions.register("vispruner")
class VisPruner(InputReduction):
    """VisPruner: important tokens by [CLS] attention, then diverse tokens from the rest by removing duplicates.

    ``int(k * important_ratio)`` tokens by [CLS] attention; the rest of the budget from the remainder, thinned in
    rounds that drop the tokens most similar (cosine of the tower's features) to another remainder token. A SigLIP
    tower (no [CLS]) ranks by the mean attention each patch receives, as the reference's ``siglip_encoder.py``.
    Reference: VisPruner ``llava/model/llava_arch.py`` lines 147-185 (`vispruner_select`).

    Args:
        keep: tokens kept per image (an int), or a fraction of them in (0, 1] (rounded up).
        important_ratio: the share of the budget chosen by attention, in [0, 1] (the reference's default 0.5).
        tokens: the image tokens the budget is taken from.
        per: ``image`` (one budget per image, a video counting as one) or ``frame`` (one per frame of a video).

    Example:
        >>> VisPruner(keep=64).important_ratio
        0.5
    """

    def __init__(self, keep: int | float = 64, important_ratio: float = 0.5, tokens: SelectionSpec = "visual", per: BudgetPer = "image"):
        if isinstance(important_ratio, bool) or not isinstance(important_ratio, (int, float)) or not 0.0 <= important_ratio <= 1.0:
            raise InterventionError(f"important_ratio: expected a share of the budget in [0, 1]; got {important_ratio!r}")
        self._init_budget(keep, tokens, per)
        self.important_ratio = float(important_ratio)

    check = _vision_reduction_check

    def choose(self, ctx: Context, candidates: torch.Tensor) -> torch.Tensor:
        read = read_tower(ctx.adapter, ctx.batch, candidates, features=True)
        return vispruner_select(read.attention, read.features, candidates, self.groups(ctx), self.budget, self.important_ratio)

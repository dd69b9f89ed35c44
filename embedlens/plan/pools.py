"""Refuse a matched random control whose pool cannot supply its target's count, before the run's main pass.

A matched control (`prune_random_matched`, `ablate_random_matched`) with
``exclude_target: true`` (the default) draws as many tokens as its target has
from the pool outside the target. Where the target is most of an image (alive
tokens, or dead ones on a mostly blank image) there are not enough: that used
to fail at the batch holding such a sample, after minutes of the main pass.
This pass labels every sample first (the partition's own sites only: the
vision tower and the LLM input, cheap beside the run) and names the first
sample that falls short, its counts and the plan line to change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import torch

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch
    from embedlens.groups import Partition
    from embedlens.interventions.condition import Condition
    from embedlens.plan.loader import LoadedPlan


def outside_target_draws(conditions: "list[Condition]") -> list[tuple[str, int, object]]:
    """``(condition, index, intervention)`` of every matched random draw made outside its target."""
    from embedlens.interventions.ablate import AblateRandomMatched
    from embedlens.interventions.prune import PruneRandomMatched

    return [(c.name, i, iv) for c in conditions for i, iv in enumerate(c.interventions)
            if isinstance(iv, (PruneRandomMatched, AblateRandomMatched)) and iv.exclude_target]


def short_samples(batch: "Batch", groups: "Callable[[str], torch.Tensor] | None", iv) -> list[tuple[str, int, int]]:
    """``(sample id, target tokens, pool tokens outside the target)`` of the batch's samples whose pool is too small.

    Example:
        >>> from embedlens.interventions.prune import PruneRandomMatched
        >>> from embedlens.adapters import load_model
        >>> from embedlens.data import Sample
        >>> from embedlens.testing.images import checkerboard
        >>> ad = load_model("tiny:llava-clip")
        >>> batch = ad.encode([Sample([checkerboard()], question="what?", id="a")])
        >>> short_samples(batch, None, PruneRandomMatched(target="visual and row < 3"))  # 12 of 16 tokens: 4 left
        [('a', 12, 4)]
    """
    roles = batch.roles
    image = roles.image_span
    target = iv.target_sel.evaluate(roles, groups) & image  # [batch, seq]
    pool = iv.pool_sel.evaluate(roles, groups) & image & ~target.to(image.device)
    n_target, n_pool = target.sum(dim=1).cpu(), pool.sum(dim=1).cpu()  # once per batch: two [batch] vectors
    short = (n_target > n_pool).nonzero().flatten().tolist()
    return [(batch.samples[b].id, int(n_target[b]), int(n_pool[b])) for b in short]


def check_pools(loaded: "LoadedPlan", adapter: "Adapter", partition: "Partition | None", conditions: "list[Condition]",
                stream: "Iterable[tuple[Batch, dict]]") -> None:
    """Read ``(batch, acts at partition.sites)`` for every batch; raise at the first sample a draw cannot serve.

    Raises:
        PlanError: at ``conditions.NAME[i].params``, naming the sample, its counts and ``exclude_target: false``.
    """
    from embedlens.interventions.engine import _lookup

    draws = outside_target_draws(conditions)
    for batch, acts in stream:
        groups = _lookup(partition.label(adapter, batch, acts=acts)) if partition is not None else None
        for name, i, iv in draws:
            short = short_samples(batch, groups, iv)
            if short:
                sid, nt, npool = short[0]
                raise loaded.error(
                    ("conditions", name, i, "params"),
                    f"{type(iv).registered_name}: sample {sid!r} has {nt} target tokens ({iv.target!r}) but only {npool} "
                    f"pool tokens ({iv.pool!r}) outside the target to draw a matched control from"
                    + (f" ({len(short)} such samples in its batch)" if len(short) > 1 else "")
                    + "; set exclude_target: false to draw from the whole pool (the report then gives the control's "
                    "overlap with its target), or use a smaller target")

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

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch
    from embedlens.groups import Partition
    from embedlens.interventions.condition import Condition
    from embedlens.plan.loader import LoadedPlan
    from embedlens.roles import TokenRoles


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
    n_target, n_pool = _counts(batch.roles, groups, iv)
    short = (n_target > n_pool).nonzero().flatten().tolist()
    return [(batch.samples[b].id, int(n_target[b]), int(n_pool[b])) for b in short]


def _counts(roles: "TokenRoles", groups, iv) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch]`` target tokens and pool tokens outside the target, within each sample's image span (on the host)."""
    image = roles.image_span
    target = iv.target_sel.evaluate(roles, groups) & image  # [batch, seq]
    pool = iv.pool_sel.evaluate(roles, groups) & image & ~target.to(image.device)
    return target.sum(dim=1).cpu(), pool.sum(dim=1).cpu()  # once per batch: two [batch] vectors


def _short_error(loaded: "LoadedPlan", name: str, i: int, iv, sid: str, nt: int, npool: int, more: str = ""):
    return loaded.error(
        ("conditions", name, i, "params"),
        f"{type(iv).registered_name}: sample {sid!r} has {nt} target tokens ({iv.target!r}) but only {npool} "
        f"pool tokens ({iv.pool!r}) outside the target to draw a matched control from{more}"
        "; set exclude_target: false to draw from the whole pool (the report then gives the control's "
        "overlap with its target), or use a smaller target")


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
                more = f" ({len(short)} such samples in its batch)" if len(short) > 1 else ""
                raise _short_error(loaded, name, i, iv, sid, nt, npool, more)


def fixed_layout(grid: tuple[int, int], n_images: int, cls: bool = False) -> "TokenRoles":
    """The role map `[1, seq]` of one sample's image span where every image is the same `grid` of visual tokens
    (row-major, after a CLS token where the model keeps one) and nothing else: what an image-span selection sees.

    Example:
        >>> roles = fixed_layout((2, 3), 2)
        >>> roles.visual.sum().item(), roles.row[0, :6].tolist(), roles.image[0, -1].item()
        (12, [0, 0, 0, 1, 1, 1], 1)
    """
    import torch

    from embedlens.roles import Role, TokenRoles

    h, w = grid
    per = h * w + int(cls)
    kind = torch.full((n_images, per), int(Role.VISUAL))
    row = torch.arange(h).repeat_interleave(w).expand(n_images, -1)
    col = torch.arange(w).repeat(h).expand(n_images, -1)
    if cls:
        kind[:, 0] = int(Role.IMAGE_CLS)
        minus = torch.full((n_images, 1), -1)
        row, col = torch.cat([minus, row], dim=1), torch.cat([minus, col], dim=1)
    image = torch.arange(n_images)[:, None].expand(-1, per)
    feature_col = torch.arange(per).expand(n_images, -1) - int(cls)
    flat = lambda t: t.reshape(1, -1)  # noqa: E731 - the images one after another in one sequence
    return TokenRoles(kind=flat(kind), image=flat(image), tile=flat(torch.zeros_like(kind)), row=flat(row), col=flat(col),
                      feature_row=flat(image), feature_col=flat(feature_col))


def _uses_position(sel) -> bool:
    import ast

    return sel.tree is not None and any(isinstance(n, ast.Name) and n.id == "position" for n in ast.walk(sel.tree))


def check_fixed_pools(loaded: "LoadedPlan", grid: "tuple[int, int] | None", cls: bool, conditions: "list[Condition]",
                      records: list) -> list[str]:
    """Refuse, before any model loads, a matched draw whose pool is short on every image of a fixed layout.

    Computable where the target and pool are fixed selections (roles, ``row``/``col``/``index``/``image``
    comparisons, index lists) and the family gives every image the same `grid` (LLaVA): then each sample's
    counts follow from its number of images. A target naming a partition group (``dead``) is known only
    after the model's forward pass, and a family that tiles or resizes images has a layout per image: those
    are returned as notes, and the run checks them on every sample before its main pass (`check_pools`).

    Args:
        grid: (rows, cols) of every image's visual tokens, or None where the family has no fixed grid.
        cls: the image span starts with the tower's CLS token (LLaVA's "full" selection on CLIP).
        records: the plan's samples (only their ids and image counts are read).

    Raises:
        PlanError: at ``conditions.NAME[i].params``, naming the first sample short of tokens and its counts.
    """
    notes = []
    for name, i, iv in outside_target_draws(conditions):
        where = f"conditions.{name}[{i}] ({type(iv).registered_name})"
        groups = sorted(iv.target_sel.group_names() | iv.pool_sel.group_names())
        if groups:
            notes.append(f"{where}: the pool outside the target depends on the partition's group(s) {', '.join(groups)}, "
                         "known only from the model's forward pass; the run counts it on every sample before its main pass")
            continue
        if _uses_position(iv.target_sel) or _uses_position(iv.pool_sel):
            notes.append(f"{where}: the selection compares token positions, which depend on each prompt; the run "
                         "counts the pool on every sample before its main pass")
            continue
        if grid is None:
            notes.append(f"{where}: this model family lays each image out by its size; the run counts the pool on "
                         "every sample before its main pass")
            continue
        import torch  # the selections are counted on a role map, as the run counts them (`short_samples`)

        counts: dict[int, tuple[int, int]] = {}
        for k in sorted({len(r.images) for r in records}):
            nt, npool = _counts(fixed_layout(grid, k, cls), None, iv) if k else (torch.zeros(1), torch.zeros(1))
            counts[k] = int(nt[0]), int(npool[0])  # validation, before any model: no device to wait for
        short = [r for r in records if counts[len(r.images)][0] > counts[len(r.images)][1]]
        if short:
            nt, npool = counts[len(short[0].images)]
            more = f" (as do {len(short) - 1} more of the plan's {len(records)} samples)" if len(short) > 1 else ""
            raise _short_error(loaded, name, i, iv, short[0].id, nt, npool, more)
    return notes

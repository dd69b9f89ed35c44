"""Which visual tokens a condition acted on, read from its finished run (for token maps and "tokens removed" axes).

Read from what the engine did, not from what a plugin says it did, so any
intervention (a third-party one included) is covered:

- ``removed``: a visual token present in no LLM layer (pruned before layer 0);
- ``masked``: present, but no query may attend to it in layer 0 (pruning by mask);
- ``replaced``: its LLM input was edited (ablation by zero, mean or word);
- ``dropped``: present at the input, absent from some later layer (FastV, withdrawal).

A token gets the first of these that applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from embedlens.interventions.base import Intervention
    from embedlens.interventions.engine import Outcome

ACTIONS = ("removed", "masked", "replaced", "dropped")
COLUMNS = ("sample_id", "condition", "action", "index", "image", "tile", "row", "col", "frame", "n_visual")


def touched_masks(outcome: "Outcome", interventions: "list[Intervention]") -> dict[str, torch.Tensor]:
    """``{action: [batch, seq] bool}`` over the visual tokens of the outcome's batch (see the module doc)."""
    ctx = outcome.context
    vis = ctx.roles.visual & ctx.valid
    removed = vis & (ctx.exit <= ctx.enter.clamp(min=0))
    free = vis & ~removed
    masked = torch.zeros_like(vis)
    for iv in interventions:
        blocked = iv.blocked(ctx, 0)
        if blocked is not None:
            src, dst = blocked
            everyone = (src | ~ctx.valid).all(dim=1, keepdim=True)  # every query of the sample is blocked from dst
            masked |= dst.to(vis.device) & everyone.to(vis.device)
    masked &= free
    edited = ctx.edited if ctx.edited is not None else torch.zeros_like(vis)
    replaced = edited & free & ~masked
    dropped = free & ~masked & ~replaced & (ctx.exit < ctx.n_layers)
    return {"removed": removed, "masked": masked, "replaced": replaced, "dropped": dropped}


def touched_rows(outcome: "Outcome", interventions: "list[Intervention]", condition: str) -> dict[str, list]:
    """One row per visual token the condition acted on: sample id, action, the token's visual index and patch.

    ``n_visual`` is the sample's number of visual tokens, so a reader can tell
    "every token removed" (a blind condition) from "some".
    """
    ctx = outcome.context
    roles = ctx.roles
    vis = roles.visual & ctx.valid
    index = vis.long().cumsum(dim=1) - 1  # n-th visual token of its sample
    masks = touched_masks(outcome, interventions)
    # everything the table reads leaves the device in one transfer; the rows are then cut on the host
    fields = ("image", "tile", "row", "col", "frame")
    host = torch.stack([*(m.long() for m in masks.values()), index, *(getattr(roles, f) for f in fields), vis.long()]).cpu()
    n_visual = host[-1].sum(dim=1).tolist()
    at = {name: host[len(masks) + 1 + i] for i, name in enumerate(fields)}
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    for k, action in enumerate(masks):
        b, pos = host[k].bool().nonzero(as_tuple=True)
        rows["sample_id"] += [ctx.batch.samples[i].id for i in b.tolist()]
        rows["condition"] += [condition] * len(b)
        rows["action"] += [action] * len(b)
        rows["index"] += host[len(masks)][b, pos].tolist()
        for name in fields:
            rows[name] += at[name][b, pos].tolist()
        rows["n_visual"] += [n_visual[i] for i in b.tolist()]
    return rows

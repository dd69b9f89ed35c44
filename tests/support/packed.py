"""Packed-tower helpers for the shared proofs (test support, not installed)."""

from __future__ import annotations

import torch


def without_class_rows(hidden: torch.Tensor, inputs) -> torch.Tensor:
    """A packed tower's `[1, rows, d]` block output without the class token LLaVA-OneVision-1.5's tower puts before
    each image's patches (its blocks see patches + images rows; `vision.layers` holds the patches); other towers'
    as they are. Written from the model's ``cls_embeddings.prepend_cls``: one class row, then the image's patches."""
    thw = inputs.get("image_grid_thw")
    if thw is None or hidden.shape[1] != int(thw.prod(-1).sum()) + len(thw):
        return hidden
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (thw.prod(-1) + 1).cumsum(0)[:-1]])  # each image's class row
    keep = torch.ones(hidden.shape[1], dtype=torch.bool)
    keep[starts] = False
    return hidden[:, keep]

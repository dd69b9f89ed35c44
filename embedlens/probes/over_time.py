"""A video's tokens over time: per place of the frame grid (sample, image, row, col), how its tokens behave
across frames (temporal patches).

- `group_persistence`: in how many of a place's frames its token is in a group (does a dead token stay dead?);
- `top1_agreement`: the share of a place's frames whose top-1 vocabulary id is the place's most frequent one
  (1 where every frame reads the same word: static content on a model that sees it the same way).

Both run on the device in a few scatters over the batch's video tokens (image tokens, ``frame == -1``, are
left out) and return whole tensors, one row per place, in the order of `places`.
"""

from __future__ import annotations

import torch


def places(vt: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(video, inverse, keys)``: the mask of video tokens in `vt`, each one's place index, and ``[places, 4]``
    (sample, image, row, col) of every place."""
    video = vt["frame"] >= 0
    cols = torch.stack([vt[c][video] for c in ("sample", "image", "row", "col")], dim=1)  # [tokens, 4]
    keys, inverse = torch.unique(cols, dim=0, return_inverse=True)
    return video, inverse, keys


def group_persistence(vt: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys, n_frames, n_in)``: per place, its frames and those in which its token is in `mask` (one bool per
    token of `vt`)."""
    video, inverse, keys = places(vt)
    n = len(keys)
    n_frames = torch.bincount(inverse, minlength=n)
    n_in = torch.bincount(inverse, weights=mask[video].to(torch.float64), minlength=n).round().long()
    return keys, n_frames, n_in


def top1_agreement(vt: dict[str, torch.Tensor], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys, n_frames, n_agree)``: per place, its frames and how many of them have its most frequent top-1 id
    (`ids`: one vocabulary id per token of `vt`)."""
    video, inverse, keys = places(vt)
    n = len(keys)
    n_frames = torch.bincount(inverse, minlength=n)
    pairs = torch.stack([inverse, ids[video].to(inverse.device)], dim=1)
    uniq, counts = torch.unique(pairs, dim=0, return_counts=True)
    n_agree = torch.zeros(n, dtype=counts.dtype, device=counts.device).scatter_reduce(0, uniq[:, 0], counts, "amax")
    return keys, n_frames, n_agree

"""Ranks within each image on the device: the shared core of `Budget.keep_mask` and the methods' sub-budgets."""

from __future__ import annotations



def image_groups(candidates: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """`[batch, seq]` long: each candidate's image within its sample, ``seq`` (one bucket past every image) for the rest."""
    import torch

    seq = candidates.shape[1]
    return torch.where(candidates & (image >= 0), image, torch.full_like(image, seq))


def group_sizes(group: torch.Tensor) -> torch.Tensor:
    """`[batch, seq + 1]` long: how many tokens each group of `image_groups` holds (the last bucket: non-candidates)."""
    import torch

    batch, seq = group.shape
    n = torch.zeros(batch, seq + 1, dtype=torch.long, device=group.device)
    return n.scatter_add_(1, group, torch.ones_like(group))


def ranks(keys: list[torch.Tensor], candidates: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """`[batch, seq]` long: each candidate's rank in its image (0 first), ordered by `keys` and then by position.

    Args:
        keys: `[batch, seq]` tensors, most significant first; each sorts ascending (negate a score to put the
            highest first). Ties after the last key go to the earlier position.
        candidates: `[batch, seq]` bool; image: `[batch, seq]` long (`TokenRoles.image`, -1 off images).

    Returns:
        ranks of candidates; a non-candidate's rank is meaningless (mask it).
    """
    import torch

    batch, seq = candidates.shape
    group = image_groups(candidates, image)
    order = torch.arange(seq, device=candidates.device).expand(batch, seq)
    for key in reversed(keys):  # least significant first: stable sorts keep the earlier order on ties
        k = key.double().masked_fill(~candidates, 0.0).gather(1, order)
        order = order.gather(1, torch.argsort(k, dim=1, stable=True))
    order = order.gather(1, torch.argsort(group.gather(1, order), dim=1, stable=True))
    n = group_sizes(group)
    start = torch.cumsum(n, dim=1) - n  # first sorted slot of each group
    rank_sorted = torch.arange(seq, device=candidates.device).expand(batch, seq) - start.gather(1, group.gather(1, order))
    return torch.empty_like(order).scatter_(1, order, rank_sorted)


def frame_groups(image: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """`[batch, seq]` long: one group per (image, frame) of each sample, numbered 0.. in sorted order; -1 off images.

    An image's tokens (frame -1) form one group, a video's tokens one group per frame (temporal patch). The ids are
    dense within each sample (below ``seq``), so they index the same ``seq + 1`` columns as `image_groups`; computed
    by one sort on the device (no host reads, no loop over frames).
    """
    import torch

    batch, seq = image.shape
    on = image >= 0
    key = torch.where(on, image * (seq + 2) + frame + 1, torch.full_like(image, -1))  # frame >= -1: key unique per pair
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    new = torch.ones_like(sorted_key, dtype=torch.bool)
    new[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    dense = torch.cumsum(new.long(), dim=1) - 1 - (~on).any(dim=1, keepdim=True).long()  # off-image keys sort first
    return torch.where(on, torch.empty_like(dense).scatter_(1, order, dense), torch.full_like(image, -1))

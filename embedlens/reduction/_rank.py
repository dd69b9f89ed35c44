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

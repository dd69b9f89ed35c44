"""Layouts of anyres families (base image + tile grid, unpadding, newline tokens), read off the model's own packing.

Instead of re-deriving the model's unpadding and newline rules, each tile's
features are replaced by their coordinates and passed through the family's
own `pack_image_features`: whatever the model does to features it then does
to the coordinates, so the layout cannot drift from the model's code.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

# Packs one `[tiles, h*w, 3]` tensor per image into one `[tokens, 3]` tensor per image,
# writing the newline vector (zeros here) where the model inserts its newline token.
PackFn = Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]


def packed_layouts(n_tiles: Sequence[int], grid: tuple[int, int], pack: PackFn) -> list[torch.Tensor]:
    """Layouts of anyres images, computed by the model's packing applied to patch coordinates.

    Args:
        n_tiles: tiles of each image (the base image counts as tile 0), in batch order.
        grid: (rows, cols) of one tile's patch grid.
        pack: the model's packing, called with one `[tiles, rows*cols, 3]` float tensor
            per image holding (tile + 1, row + 1, col + 1); it must put zeros where a
            newline token goes.

    Returns:
        one `[n_tokens, 5]` long tensor per image: (tile, row, col, feature_row,
        feature_col) as `Adapter.image_layouts` returns them; feature rows count
        tiles across the whole batch.
    """
    h, w = grid
    r, c = torch.meshgrid(torch.arange(h) + 1.0, torch.arange(w) + 1.0, indexing="ij")
    coords = [
        torch.stack([torch.arange(n)[:, None] + torch.ones(n, h * w), r.flatten().expand(n, -1), c.flatten().expand(n, -1)], dim=-1)
        for n in n_tiles
    ]
    out, first_row = [], 0
    for n, feats in zip(n_tiles, pack(coords)):
        feats = feats.round().long()
        newline = feats[:, 0] == 0
        tile = feats[:, 0] - 1
        row, col = feats[:, 1] - 1, feats[:, 2] - 1
        none = torch.full_like(tile, -1)
        out.append(
            torch.stack(
                [
                    torch.where(newline, none, tile),
                    torch.where(newline, none, row),
                    torch.where(newline, none, col),
                    torch.where(newline, none, first_row + tile),
                    torch.where(newline, none, row * w + col),
                ],
                dim=1,
            )
        )
        first_row += n
    return out

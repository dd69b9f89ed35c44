"""Small deterministic images for tests, docs and the quickstart."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def checkerboard(size: int = 32, cells: int = 4) -> Image.Image:
    """A black/white checkerboard, `cells` x `cells`."""
    idx = (np.arange(size) * cells // size)
    board = ((idx[:, None] + idx[None, :]) % 2).astype(np.uint8) * 255
    return Image.fromarray(np.stack([board] * 3, axis=-1))


def shapes(size: int = 64, seed: int = 0) -> Image.Image:
    """A plain background with a few coloured shapes, deterministic by seed."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(180, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    palette = [(220, 30, 30), (30, 160, 60), (40, 70, 220), (240, 200, 20), (150, 40, 180)]
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        s = int(rng.integers(size // 6, size // 3))
        color = palette[int(rng.integers(len(palette)))]
        if rng.random() < 0.5:
            draw.ellipse([x, y, x + s, y + s], fill=color)
        else:
            draw.rectangle([x, y, x + s, y + s], fill=color)
    return im


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    """Uniform RGB noise of the given size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))

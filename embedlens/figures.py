"""Figures: token maps drawn over the image the vision tower saw."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def token_map(
    pixels: torch.Tensor,
    rows: Sequence[int],
    cols: Sequence[int],
    labels: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Draw `pixels` with the patch grid and one text label per patch.

    Args:
        pixels: `[H, W, 3]` image in 0..1.
        rows, cols, labels: one entry per patch.
        path: output file (.png or .svg).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = max(rows) + 1, max(cols) + 1
    h, w = pixels.shape[:2]
    ph, pw = h / n_rows, w / n_cols
    size = max(4.0, 0.55 * max(n_rows, n_cols))
    fig, ax = plt.subplots(figsize=(size, size * h / w + 0.6))
    ax.imshow(pixels.numpy(), extent=(0, w, h, 0), interpolation="nearest")
    for r in range(n_rows + 1):
        ax.axhline(r * ph, color="white", lw=0.5, alpha=0.7)
    for c in range(n_cols + 1):
        ax.axvline(c * pw, color="white", lw=0.5, alpha=0.7)
    fontsize = max(4, min(9, int(220 / max(n_rows, n_cols))))
    for r, c, label in zip(rows, cols, labels):
        ax.text(
            (c + 0.5) * pw,
            (r + 0.5) * ph,
            str(label).replace("\n", "\\n"),
            ha="center",
            va="center",
            fontsize=fontsize,
            color="white",
            bbox=dict(boxstyle="round,pad=0.1", fc="black", alpha=0.55, lw=0),
        )
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path

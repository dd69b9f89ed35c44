"""Figures: token maps drawn over the image the vision tower saw."""

from __future__ import annotations

import contextvars
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from embedlens.anchors import AnchorRule


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
    return _save(fig, path)


GROUP_COLOURS = {"sink": "#d62728", "dead": "#7f7f7f", "alive": "#2ca02c", "visual": "#1f77b4"}
_CYCLE = ["#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#1f77b4"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Extra vector copies written beside every PNG (the runner sets it from `output.figure_formats`).
EXTRA_FORMATS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("EXTRA_FORMATS", default=())


def _save(fig, path: str | Path) -> Path:
    """Write a figure reproducibly: the same figure gives the same bytes (no dates, fixed SVG ids)."""
    import matplotlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150, metadata={"Software": None} if path.suffix == ".png" else {"Date": None})
    for fmt in EXTRA_FORMATS.get():
        if fmt != path.suffix.lstrip("."):
            with matplotlib.rc_context({"svg.hashsalt": "embedlens"}):
                fig.savefig(path.with_suffix("." + fmt), dpi=150, metadata={"Date": None} if fmt in ("svg", "pdf") else None)
    _plt().close(fig)
    return path


def category_map(
    pixels: torch.Tensor,
    rows: Sequence[int],
    cols: Sequence[int],
    categories: Sequence[str],
    path: str | Path,
    title: str = "",
    labels: Sequence[str] | None = None,
) -> Path:
    """The image with each patch tinted by its category (sink / dead / alive, cluster, ...).

    Known group names get fixed colours (sink red, dead grey, alive green);
    other categories take colours in order. `labels` adds text per patch.
    """
    from matplotlib.patches import Patch, Rectangle

    plt = _plt()
    names = list(dict.fromkeys(categories))
    colours = {}
    for i, n in enumerate(names):
        colours[n] = GROUP_COLOURS.get(n, _CYCLE[i % len(_CYCLE)])
    n_rows, n_cols = max(rows) + 1, max(cols) + 1
    h, w = pixels.shape[:2]
    ph, pw = h / n_rows, w / n_cols
    size = max(4.0, 0.45 * max(n_rows, n_cols))
    fig, ax = plt.subplots(figsize=(size + 1.5, size * h / w + 0.6))
    ax.imshow(pixels.numpy(), extent=(0, w, h, 0), interpolation="nearest")
    for r, c, cat in zip(rows, cols, categories):
        ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, facecolor=colours[cat], alpha=0.45, edgecolor="white", lw=0.4))
    if labels is not None:
        fs = max(4, min(9, int(220 / max(n_rows, n_cols))))
        for r, c, lab in zip(rows, cols, labels):
            ax.text((c + 0.5) * pw, (r + 0.5) * ph, str(lab), ha="center", va="center", fontsize=fs, color="black")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(handles=[Patch(color=colours[n], label=n) for n in names], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    return _save(fig, path)


def value_map(
    pixels: torch.Tensor, rows: Sequence[int], cols: Sequence[int], values: Sequence[float], path: str | Path, title: str = "", label: str = ""
) -> Path:
    """The image with a heat map of one value per patch (attention received, entropy, ...)."""
    plt = _plt()
    n_rows, n_cols = max(rows) + 1, max(cols) + 1
    grid = torch.full((n_rows, n_cols), float("nan"))
    for r, c, v in zip(rows, cols, values):
        grid[r, c] = float(v)
    h, w = pixels.shape[:2]
    fig, ax = plt.subplots(figsize=(5.5, 4.5 * h / w + 0.6))
    ax.imshow(pixels.numpy(), extent=(0, w, h, 0), interpolation="nearest")
    im = ax.imshow(grid.numpy(), extent=(0, w, h, 0), alpha=0.6, cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=label, fraction=0.046)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    return _save(fig, path)


def layer_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, xlabel: str = "LLM layer", ylabel: str = "", title: str = ""
) -> Path:
    """One line per named curve, `(xs, ys)` each (per-layer statistics)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        ax.plot(list(xs), list(ys), marker="o", ms=3, label=name, color=GROUP_COLOURS.get(name, _CYCLE[i % len(_CYCLE)]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def histograms(hists: dict[str, dict[str, list]], path: str | Path, xlabel: str = "", title: str = "") -> Path:
    """Overlaid step histograms from ``{name: {"edges": [...], "counts": [...]}}`` (normalised per name)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, h) in enumerate(hists.items()):
        counts = torch.tensor(h["counts"], dtype=torch.float64)
        if counts.sum() == 0:
            continue
        ax.stairs((counts / counts.sum()).numpy(), h["edges"], label=name, color=GROUP_COLOURS.get(name, _CYCLE[i % len(_CYCLE)]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of tokens")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def effect_chart(
    effects: dict[str, dict[str, dict[str, float]]],
    metric: str,
    path: str | Path,
    controls: dict[str, str] | None = None,
    title: str = "",
) -> Path:
    """Bar chart of one metric per condition (mean with standard error), each control bar beside its condition.

    Args:
        effects: ``{condition: {metric: {"mean", "sem", "n"}}}`` (baseline values under the metric's own column).
        metric: the column to chart.
        controls: ``{condition: its matched random control}``; controls are hatched and drawn right after theirs.
    """
    plt = _plt()
    controls = controls or {}
    is_control = set(controls.values())
    order: list[str] = []
    for cond in effects:
        if cond in is_control or metric not in effects[cond]:
            continue
        order.append(cond)
        ctrl = controls.get(cond)
        if ctrl is not None and metric in effects.get(ctrl, {}):
            order.append(ctrl)
    order += [c for c in effects if c not in order and metric in effects[c]]
    means = [effects[c][metric]["mean"] for c in order]
    sems = [effects[c][metric].get("sem", 0.0) or 0.0 for c in order]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(order) + 1.5), 3.2))
    colours = ["#bbbbbb" if c in is_control else "#1f77b4" for c in order]
    bars = ax.bar(range(len(order)), means, yerr=sems, color=colours, capsize=3)
    for b, c in zip(bars, order):
        if c in is_control:
            b.set_hatch("//")
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} by condition (hatched: matched random control)", fontsize=9)
    return _save(fig, path)


def evidence_figure(table: list[dict[str, Any]], rule: "AnchorRule", path: Path, title: str = "") -> Path:
    """Each id at (share of images, relative dispersion), coloured by verdict, with the rule's thresholds."""
    plt = _plt()
    colours = {"sink": "#d62728", "dead": "#7f7f7f", "content": "#2ca02c", "rare": "#bcbd22", "excess": "#ff7f0e"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    floor = 1e-4
    for verdict, colour in colours.items():
        pts = [r for r in table if r["verdict"] == verdict and not math.isnan(r["relative_dispersion"])]
        if pts:
            ax.scatter([r["image_fraction"] for r in pts], [max(r["relative_dispersion"], floor) for r in pts],
                       s=[20 + 400 * r["token_share"] for r in pts], c=colour, alpha=0.8, label=verdict, edgecolors="black", linewidths=0.4)
    for r in sorted(table, key=lambda r: -r["tokens"])[:15]:
        if not math.isnan(r["relative_dispersion"]):
            ax.annotate(str(r["token"]), (r["image_fraction"], max(r["relative_dispersion"], floor)), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ys = [max(r["relative_dispersion"], floor) for r in table if not math.isnan(r["relative_dispersion"])]
    ax.set_ylim(min(ys + [rule.max_dispersion]) / 3, max(ys + [1.0]) * 3)
    ax.axhline(rule.max_dispersion, color="black", lw=0.8, ls="--")
    ax.axvline(rule.min_image_fraction, color="black", lw=0.8, ls=":")
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("share of images where the id is some token's nearest (dotted: min_image_fraction)")
    ax.set_ylabel("dispersion / other tokens' (dashed: max_dispersion)")
    ax.set_title(title or "Anchor discovery: dead anchors collapse, content words spread (marker size: token share)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", markerscale=0.6)
    return _save(fig, path)

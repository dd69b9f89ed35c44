"""Figures: token maps drawn over the image the vision tower saw."""

from __future__ import annotations

import contextvars
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
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
            literal(str(label).replace("\n", "\\n")),
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


def literal(text: object) -> str:
    """`text` drawn as written: matplotlib reads ``$...$`` as mathtext, so a vocabulary word or a sample id such as
    ``$\\alpha$`` would be typeset, or stop the figure with a parse error (``\\$`` is a literal dollar)."""
    return str(text).replace("$", r"\$")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Extra vector copies written beside every PNG (the runner sets it from `output.figure_formats`).
EXTRA_FORMATS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("EXTRA_FORMATS", default=())


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    """Write a figure reproducibly: the same figure gives the same bytes (no dates, fixed SVG ids)."""
    import matplotlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
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
    colours = category_colours(names)
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
            ax.text((c + 0.5) * pw, (r + 0.5) * ph, literal(lab), ha="center", va="center", fontsize=fs, color="black", bbox=LABEL_BACKING)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(handles=[Patch(color=colours[n], label=literal(n)) for n in names], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    return _save(fig, path)


def category_colours(names: Sequence[str]) -> dict[str, str]:
    """A colour per category that does not depend on which run drew it: token groups fixed (sink red, dead grey,
    alive green), other categories in their natural order (``cluster 2`` before ``cluster 10``), so that the same
    category has the same colour on maps drawn side by side.

    Example:
        >>> category_colours(["cluster 1", "alive", "cluster 0"])
        {'cluster 1': '#ff7f0e', 'alive': '#2ca02c', 'cluster 0': '#9467bd'}
    """
    import re

    def natural(n: str) -> list:
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(n))]

    others = sorted((n for n in dict.fromkeys(names) if n not in GROUP_COLOURS), key=natural)
    return {n: GROUP_COLOURS.get(n) or _CYCLE[others.index(n) % len(_CYCLE)] for n in dict.fromkeys(names)}


def value_map(
    pixels: torch.Tensor, rows: Sequence[int], cols: Sequence[int], values: Sequence[float], path: str | Path, title: str = "", label: str = "",
    vmin: float | None = None, vmax: float | None = None,
) -> Path:
    """The image with a heat map of one value per patch (attention received, entropy, ...).

    `vmin`/`vmax` fix the colour scale (a quantity with a known range, such as a normalised entropy in 0..1, gets
    the same scale in every run, so maps of two models side by side read alike); default: this image's range."""
    plt = _plt()
    n_rows, n_cols = max(rows) + 1, max(cols) + 1
    grid = torch.full((n_rows, n_cols), float("nan"))
    for r, c, v in zip(rows, cols, values):
        grid[r, c] = float(v)
    h, w = pixels.shape[:2]
    fig, ax = plt.subplots(figsize=(5.5, 4.5 * h / w + 0.6))
    ax.imshow(pixels.numpy(), extent=(0, w, h, 0), interpolation="nearest")
    im = ax.imshow(grid.numpy(), extent=(0, w, h, 0), alpha=0.6, cmap="magma", interpolation="nearest", vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax, label=label, fraction=0.046)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    return _save(fig, path)


#: At most this many x positions get a tick each (the model's layer numbers); more get whole-number ticks.
MAX_LAYER_TICKS = 16


def layer_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, xlabel: str = "LLM layer", ylabel: str = "", title: str = "",
    legend_title: str = "", xticklabels: dict[int, str] | None = None,
) -> Path:
    """One line per named curve, `(xs, ys)` each (per-layer statistics).

    Args:
        curves: ``{name: (xs, ys)}``; xs are the model's layer numbers, ticked as they are (whole numbers only).
        ylabel: the quantity, and the group where one curve is drawn (the legend names the curves).
        legend_title: what the curves are (``token group``, ``run``).
        xticklabels: a name per x position, where the x values are not layer numbers (a probe's sites).
    """
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        ax.plot(list(xs), list(ys), marker="o", ms=3, label=name, color=GROUP_COLOURS.get(name, _CYCLE[i % len(_CYCLE)]))
    ticks = sorted({x for xs, _ in curves.values() for x in xs if isinstance(x, (int, np.integer)) or float(x).is_integer()})
    if xticklabels:
        ax.set_xticks(sorted(xticklabels), [xticklabels[k] for k in sorted(xticklabels)], fontsize=8,
                      rotation=30 if len(xticklabels) > 4 else 0, ha="right" if len(xticklabels) > 4 else "center")
    elif ticks and len(ticks) <= MAX_LAYER_TICKS:
        ax.set_xticks([int(t) for t in ticks])  # the model's own layer numbers, each a tick: no tick at 0.5
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(_wrap(title, 6), fontsize=9)
    if len(curves) > 1:
        ax.legend(fontsize=8, title=legend_title or None, title_fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def histograms(hists: dict[str, dict[str, list]], path: str | Path, xlabel: str = "", title: str = "", legend_title: str = "token group") -> Path:
    """Overlaid step histograms from ``{name: {"edges": [...], "counts": [...]}}`` (normalised per name)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, h) in enumerate(hists.items()):
        counts = torch.tensor(h["counts"], dtype=torch.float64)
        if counts.sum() == 0:
            continue
        ax.stairs((counts / counts.sum()).numpy(), h["edges"], label=name, color=GROUP_COLOURS.get(name, _CYCLE[i % len(_CYCLE)]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"share of the {legend_title}'s tokens" if legend_title else "share of tokens")
    if title:
        ax.set_title(_wrap(title, 6), fontsize=9)
    ax.legend(fontsize=8, title=legend_title or None, title_fontsize=8)
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
    width = max(5.0, 0.8 * len(order) + 2.5)
    fig, ax = plt.subplots(figsize=(width, 3.4))
    colours = [CONTROL_COLOUR if c in is_control else "#1f77b4" for c in order]
    bars = ax.bar(range(len(order)), means, yerr=sems, color=colours, capsize=3)
    for b, c in zip(bars, order):
        if c in is_control:
            b.set_hatch(CONTROL_HATCH)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel(f"{metric}: mean over samples\n(error bar: standard error)", fontsize=8)
    if any(c in is_control for c in order):
        ax.legend(handles=[control_patch()], fontsize=7, loc="best")
    ax.set_title(_wrap(title or f"{metric} by condition (hatched: matched random control)", width), fontsize=9)
    return _save(fig, path)


#: The one hatching convention of every figure (run reports, compare, eval's benchmarks.png): hatched bars are
#: matched random controls; the baseline is a line (run reports) or a dark grey bar (benchmarks), never hatched.
CONTROL_HATCH = "//"
CONTROL_COLOUR = "#bbbbbb"


def control_patch(label: str = "matched random control"):
    """The legend entry for a hatched (matched random control) bar."""
    from matplotlib.patches import Patch

    return Patch(facecolor=CONTROL_COLOUR, hatch=CONTROL_HATCH, edgecolor="black", lw=0.5, label=label)


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


# -- the effect tests (embedlens.plan.conclusions) ----------------------------------------------------------

ACTION_COLOURS = {"removed": "#d62728", "masked": "#9467bd", "replaced": "#ff7f0e", "dropped": "#1f77b4"}
#: How a token map marks what was done to a token: removed ones are veiled dark, the others hatched (readable on any colour).
ACTION_STYLE = {
    "removed": dict(facecolor="black", alpha=0.62, edgecolor="#d62728", lw=0.8),
    "masked": dict(facecolor="none", hatch="xxx", edgecolor="#9467bd", lw=0.8),
    "replaced": dict(facecolor="none", hatch="///", edgecolor="black", lw=0.8),
    "dropped": dict(facecolor="none", hatch="...", edgecolor="#1f77b4", lw=0.8),
}


def safe_name(name: str) -> str:
    """A condition or metric name as a file-name piece (names come from plans, not paths)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name)).lstrip(".")[:120] or "_"


def _wrap(text: str, width_in: float, fontsize: float = 9) -> str:
    """Wrap a title to the figure's width instead of letting matplotlib cut it off."""
    import textwrap

    chars = max(20, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars))


def removal_maps(tm: dict, path: str | Path) -> Path:
    """Which visual tokens a condition (top row) and its matched control (bottom row) acted on, for several samples.

    Args:
        tm: ``{"condition", "images": [{"sample_id", "pixels", "row", "col"}], "rows": [(name, {sample_id: {(row, col): action}})]}``;
            a panel with a ``key`` (one frame of a video) is looked up by it instead of its sample id, and titled ``title``.
    """
    from matplotlib.patches import Patch, Rectangle

    plt = _plt()
    images, rows = tm["images"], tm["rows"]
    panel = 2.4
    fig, axes = plt.subplots(len(rows), len(images), figsize=(panel * len(images) + 1.8, panel * len(rows) + 0.9), squeeze=False)
    seen: set[str] = set()
    for i, (name, acted) in enumerate(rows):
        for j, im in enumerate(images):
            ax = axes[i][j]
            px = im["pixels"]
            h, w = px.shape[:2]
            nr, nc = max(im["row"]) + 1, max(im["col"]) + 1
            ph, pw = h / nr, w / nc
            ax.imshow(px.numpy(), extent=(0, w, h, 0), interpolation="nearest")
            marks = acted.get(im.get("key", im["sample_id"]), {})
            for (r, col), action in marks.items():
                seen.add(action)
                ax.add_patch(Rectangle((col * pw, r * ph), pw, ph, **ACTION_STYLE.get(action, ACTION_STYLE["removed"])))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{im.get('title', im['sample_id'])}", fontsize=7)
            ax.set_xlabel(f"{len(marks)} of {len(im['row'])} tokens", fontsize=7)
            if j == 0:
                ax.set_ylabel(_wrap(name, panel, 8), fontsize=8)
    handles = [Patch(label=a, **ACTION_STYLE[a]) for a in ACTION_STYLE if a in seen]
    if handles:
        fig.legend(handles=handles, loc="upper right", fontsize=7)
    ctrl = f" (top) and its matched control {rows[1][0]} (bottom)" if len(rows) > 1 else ""
    fig.suptitle(_wrap(f"Tokens acted on by {rows[0][0]}{ctrl}", panel * len(images) + 1.8), fontsize=9)
    return _save(fig, path)


# -- word maps: token maps readable at real grids -------------------------------------------------------

#: Most frequent words given a colour (and a legend entry) in a word map; the rest are "other".
WORD_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2"]
OTHER_COLOUR = "#dddddd"
#: Behind every word written on an image: a light box, so black text reads on any colour underneath.
LABEL_BACKING = dict(boxstyle="round,pad=0.12", fc="white", ec="none", alpha=0.78)


def label_fits(label: str, patch_points: float, fontsize: float) -> bool:
    """Whether `label` fits in a patch `patch_points` wide at `fontsize` (about 0.6 em per character).

    Example:
        >>> label_fits("red", 30, 8), label_fits("background", 13.5, 6)
        (True, False)
    """
    return len(label) * 0.6 * fontsize <= 0.92 * patch_points and fontsize * 1.1 <= patch_points


def word_map(panels: Sequence[dict], path: str | Path, title: str = "", top: int = 12, panel_inches: float = 3.6) -> Path:
    """Several images side by side, each patch coloured by its word (the `top` most frequent words over all
    panels get a colour and a legend entry, the rest grey), the word written only where it fits.

    Readable at real grids (24x24, 27x27 patches), where a label per patch overlaps.

    Args:
        panels: ``[{"sample_id", "pixels": [H, W, 3], "row", "col", "labels"}]``, one per image.
    """
    import collections

    from matplotlib.patches import Patch, Rectangle

    plt = _plt()
    counts = collections.Counter(str(x) for p in panels for x in p["labels"])
    top_words = [w for w, _ in counts.most_common(min(top, len(WORD_COLOURS)))]
    colour = {w: WORD_COLOURS[i] for i, w in enumerate(top_words)}
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(panel_inches * n + 2.4, panel_inches + 0.9), squeeze=False)
    for ax, p in zip(axes[0], panels):
        px = p["pixels"]
        h, w = px.shape[:2]
        nr, nc = max(p["row"]) + 1, max(p["col"]) + 1
        ph, pw = h / nr, w / nc
        ax.imshow(px.numpy(), extent=(0, w, h, 0), interpolation="nearest")
        patch_pts = panel_inches * 72 / max(nr, nc)
        fs = max(4.0, min(8.0, patch_pts * 0.45))
        for r, c, lab in zip(p["row"], p["col"], p["labels"]):
            lab = str(lab)
            ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, facecolor=colour.get(lab, OTHER_COLOUR), alpha=0.55,
                                   edgecolor="white", lw=0.3))
            shown = literal(lab.replace("\n", "\\n"))
            size = min(fs, 0.92 * patch_pts / (0.6 * max(1, len(shown))))  # long words smaller, to 4.5 pt
            if size >= min(fs, 4.5) and label_fits(shown, patch_pts, size):
                ax.text((c + 0.5) * pw, (r + 0.5) * ph, shown, ha="center", va="center", fontsize=size, color="black",
                        bbox=LABEL_BACKING)
        ax.set_xticks([])
        ax.set_yticks([])
        frame = f", frame {p['frame']}" if p.get("frame", -1) >= 0 else ""  # a video's temporal patch
        ax.set_title(literal(f"{p.get('sample_id', '')}{frame} ({nr}x{nc})"), fontsize=8)
    handles = [Patch(facecolor=colour[wd], alpha=0.7, label=literal(f"{wd!s} ({counts[wd]})")) for wd in top_words]
    rest = sum(counts.values()) - sum(counts[wd] for wd in top_words)
    if rest:
        handles.append(Patch(facecolor=OTHER_COLOUR, label=f"other ({rest})"))
    fig.legend(handles=handles, loc="center right", fontsize=8, title="word (tokens)", title_fontsize=8)
    if title:
        fig.suptitle(_wrap(title, panel_inches * n + 2.4), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / (panel_inches * n + 2.4), 1))
    return _save(fig, path, tight=False)

"""Figures of a plan's conclusions: accuracy per condition, paired differences, breakdowns and sweep curves.

The drawing primitives (token maps, curves, colours, saving) live in `embedlens.figures`; this module draws
what `embedlens.plan.conclusions` measured. It calls them through the module, so a test that replaces
`figures._save` sees these figures too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedlens import figures as _f


def _ordered(c, metric: str) -> list[str]:
    """Conditions with a value for `metric`, each matched control right after its condition; the blind one left out."""
    is_control = set(c.controls.values())
    order: list[str] = []
    for cond in c.conditions:
        if cond in is_control or cond == c.blind or cond in order:
            continue
        order.append(cond)
        ctrl = c.controls.get(cond)
        if ctrl is not None and ctrl in c.conditions:
            order.append(ctrl)
    order += [x for x in c.conditions if x not in order and x != c.blind]
    return [x for x in order if _overall(c, x, metric) is not None]


def _overall(c, cond: str, metric: str, by: str = "all", group: str = "all") -> dict | None:
    for ref in ("baseline", c.controls.get(cond), ""):
        if ref is not None:
            row = c.find(cond, ref, metric, by, group)
            if row is not None:
                return row
    return None


def _reference_lines(ax, c, metric: str, horizontal: bool = True, by: str = "all", group: str = "all") -> None:
    base = c.find("baseline", "", metric, by, group)
    if base is not None:
        ax.axhline(base["mean"], color="black", lw=1.2, ls="--", label=f"baseline {base['mean']:.3f}")
        ax.axhspan(base["mean_ci_low"], base["mean_ci_high"], color="black", alpha=0.07, lw=0)
    if c.blind is not None:
        blind = _overall(c, c.blind, metric, by, group)
        if blind is not None:
            name = "blind" if c.blind == "blind" else f"blind ({c.blind})"
            ax.axhline(blind["mean"], color="#8c564b", lw=1.2, ls=":", label=f"{name} {blind['mean']:.3f}")


def accuracy_chart(c, metric: str, path: str | Path) -> Path:
    """Accuracy of each condition with its bootstrap interval on a fixed 0-1 axis; matched controls hatched beside
    their condition; the baseline (dashed, with its interval shaded) and the blind condition (dotted) as lines."""
    plt = _f._plt()
    order = _ordered(c, metric)
    is_control = set(c.controls.values())
    rows = [_overall(c, x, metric) for x in order]
    width = max(5.0, 0.75 * len(order) + 2.5)
    fig, ax = plt.subplots(figsize=(width, 4.2))
    means = [r["mean"] for r in rows]
    err = [[max(0.0, r["mean"] - r["mean_ci_low"]) for r in rows], [max(0.0, r["mean_ci_high"] - r["mean"]) for r in rows]]
    bars = ax.bar(range(len(order)), means, yerr=err, capsize=3, color=[_f.CONTROL_COLOUR if x in is_control else "#1f77b4" for x in order])
    for b, x in zip(bars, order):
        if x in is_control:
            b.set_hatch(_f.CONTROL_HATCH)
    for i, m in enumerate(means):
        ax.text(i, 0.015, f"{m:.2f}", ha="center", va="bottom", fontsize=7, color="black",
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    _reference_lines(ax, c, metric)
    handles, _ = ax.get_legend_handles_labels()
    if any(x in is_control for x in order):
        handles.append(_f.control_patch())
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(-0.02, 1.03)  # the fixed 0-1 axis, with room for lines at 0 and 1
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel(f"{metric}: share of samples right\n(mean, {int(c.spec.get('confidence', 0.95) * 100)}% Wilson interval)")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(_f._wrap(f"{metric} by condition (hatched: the matched random control beside its condition); "
                       f"n = {rows[0]['n'] if rows else 0} samples", width), fontsize=9)
    return _f._save(fig, path)


def paired_differences(c, metric: str, path: str | Path) -> Path:
    """Each condition minus the baseline and minus its matched control, on the same samples: the mean paired
    difference with its bootstrap interval, and the paired test's p-value written beside it."""
    plt = _f._plt()
    items = []
    for cond in c.conditions:
        for ref in ("baseline", c.controls.get(cond)):
            row = c.find(cond, ref, metric) if ref else None
            if row is not None:
                items.append((f"{cond} - {ref}", row, ref != "baseline"))
    height = max(2.4, 0.34 * len(items) + 1.5)
    fig, (ax, tx) = plt.subplots(1, 2, figsize=(12, height), sharey=True, gridspec_kw={"width_ratios": [1.0, 1.0]})
    for i, (label, r, vs_ctrl) in enumerate(items):
        y = len(items) - 1 - i
        colour = "#d62728" if vs_ctrl else "#1f77b4"
        ax.plot([r["diff_ci_low"], r["diff_ci_high"]], [y, y], color=colour, lw=2)
        ax.plot([r["diff"]], [y], "o", color=colour, ms=5)
        test = "McNemar" if r["test"].startswith("mcnemar") else "sign-flip"
        extra = f", {r['x_only']} vs {r['reference_only']} discordant" if r["x_only"] >= 0 else ""
        if r["test"] == "deterministic":
            tx.text(0.0, y, f"{r['diff']:+.3f} on every sample (deterministic: no test)", va="center", fontsize=8)
            continue
        holm = f", Holm {r['p_holm']:.2g}" if r.get("p_holm") == r.get("p_holm") and r.get("p_holm") is not None else ""
        tx.text(0.0, y, f"{r['diff']:+.3f} [{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}]  p={r['p_value']:.2g}{holm} "
                f"({test}{extra}); mde {r['mde']:.2f}", va="center", fontsize=8)
    tx.set_xlim(0, 1)
    tx.axis("off")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(items)), [lab for lab, _, _ in reversed(items)], fontsize=8)
    ax.set_ylim(-0.7, len(items) - 0.3)
    if metric in c.accuracy:
        ax.set_xlim(-1, 1)
    ax.set_xlabel(f"paired difference in {metric}\n(blue: minus the baseline; red: minus the matched control)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(_f._wrap(f"{metric}: condition minus reference on the same samples, {int(c.spec.get('confidence', 0.95) * 100)}% "
                       f"BCa bootstrap interval ({c.spec.get('resamples')} resamples); p raw and Holm-adjusted; "
                       "mde: smallest difference detectable with power 0.8", 11), fontsize=9)
    return _f._save(fig, path)


def breakdown_heatmap(c, metric: str, by: str, path: str | Path) -> Path:
    """Accuracy of the baseline and every condition per value of a sample field (e.g. question type), 0-1 colour scale."""
    plt = _f._plt()
    groups = list(dict.fromkeys(g for g, b, m in zip(c.rows["group"], c.rows["by"], c.rows["metric"]) if b == by and m == metric))
    names = ["baseline"] + [x for x in c.conditions]
    grid = np.full((len(names), len(groups)), np.nan)
    ns = np.zeros((len(names), len(groups)), dtype=int)
    for i, name in enumerate(names):
        for j, g in enumerate(groups):
            r = c.find("baseline", "", metric, by, g) if name == "baseline" else _overall(c, name, metric, by, g)
            if r is not None:
                grid[i, j], ns[i, j] = r["mean"], r["n"]
    width = max(5.0, 1.1 * len(groups) + 3.5)
    fig, ax = plt.subplots(figsize=(width, 0.36 * len(names) + 1.6))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(len(names)):
        for j in range(len(groups)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f} (n={ns[i, j]})", ha="center", va="center", fontsize=7,
                        color="black" if grid[i, j] > 0.6 else "white")
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    fig.colorbar(im, ax=ax, label=f"{metric}: share of samples right", fraction=0.04)
    ax.set_xlabel(by, fontsize=8)
    ax.set_title(_f._wrap(f"{metric} by {by} (cells: mean and number of samples)", width), fontsize=9)
    return _f._save(fig, path)


def sweep_curve(c, metric: str, base: str, path: str | Path) -> Path:
    """A swept condition's accuracy against the visual tokens it removed (mean per sample), with bootstrap
    intervals as a band, and the baseline and blind reference lines."""
    plt = _f._plt()
    members = c.sweeps[base]
    # by tokens touched, then name: two copies can touch as many tokens (a budget an in-LLM method cannot go below),
    # and their rows (dicts) do not compare
    pts = sorted(((c.touched.get(m, 0.0), _overall(c, m, metric), m) for m in members if _overall(c, m, metric) is not None),
                 key=lambda p: (p[0], p[2]))
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    xs = [p[0] for p in pts]
    ax.plot(xs, [p[1]["mean"] for p in pts], marker="o", color="#1f77b4", label=base)
    ax.fill_between(xs, [p[1]["mean_ci_low"] for p in pts], [p[1]["mean_ci_high"] for p in pts], color="#1f77b4", alpha=0.2, lw=0)
    for x, r, m in pts:
        ax.annotate(m.removeprefix(base), (x, r["mean"]), fontsize=7, xytext=(3, 4), textcoords="offset points")
    _reference_lines(ax, c, metric)
    ax.set_ylim(0, 1.03)
    ax.set_xlabel("visual tokens removed or replaced per sample (mean)")
    ax.set_ylabel(f"{metric}: share of samples right")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(_f._wrap(f"{base}: {metric} against tokens removed (band: {int(c.spec.get('confidence', 0.95) * 100)}% bootstrap interval)", 6.5),
                 fontsize=9)
    return _f._save(fig, path)

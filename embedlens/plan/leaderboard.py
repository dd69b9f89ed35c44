"""The token-reduction leaderboard of a run: every method at every budget, beside the baseline and random.

A *budget cell* is a condition of one intervention with a budget (``keep``, `embedlens.reduction.budget`);
its *method* is the condition as written before a sweep expanded it (``fastv`` for ``fastv[keep=0.222]``).
Its numbers come from the run's own tables: the paired tests of `embedlens.plan.conclusions` (against the
baseline, and against the random control at the same ``keep``, `embedlens.plan.effects.matched_controls`)
and the means of the cost columns (`prefill_time`, `prefill_flops`, `visual_tokens` metrics).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from embedlens.plan.effects import budget_of, budget_per
from embedlens.reduction.budget import Budget

if TYPE_CHECKING:
    from embedlens.interventions.condition import Condition
    from embedlens.plan.conclusions import Conclusions

#: Columns of the ``leaderboard`` table, in order.
COLUMNS = (
    "method", "condition", "keep", "tokens", "random", "metric", "accuracy", "accuracy_base", "retention",
    "p_baseline", "accuracy_random", "p_random", "logprob", "logprob_diff", "logprob_p_baseline", "logprob_p_random",
    "equivalent_tokens", "paper_tokens", "accounting", "prefill_ms", "prefill_ms_base", "prefill_speedup", "select_ms", "gflops", "gflops_base",
    "peak_mem_mb",
)
NAN = math.nan


def _method(name: str, sweeps: dict[str, list[str]]) -> str:
    for base, members in sweeps.items():
        if name in members:
            return base
    return name


def budget_cells(conditions: Sequence["Condition"]) -> dict[str, int | float]:
    """``{condition: its keep}`` for the conditions of one intervention that take a budget."""
    out = {}
    for c in conditions:
        if len(c.interventions) == 1 and (keep := budget_of(c.interventions[0])) is not None:
            out[c.name] = keep
    return out


def leaderboard(
    concl: "Conclusions",
    means: dict[str, dict[str, float]],
    conditions: Sequence["Condition"],
    sweeps: dict[str, list[str]],
    n_layers: int | None = None,
) -> dict[str, list[Any]] | None:
    """One row per budget cell (method x budget), ordered by method then budget (largest first); None when the run
    has no budget cell, or has one but neither sweeps it nor has a random control at a budget.

    Args:
        concl: the run's paired tests.
        means: ``{condition: {column: mean over samples}}`` (`EffectSummary.result`).
        conditions: the run's conditions (their interventions give each cell's ``keep``).
        sweeps: ``{condition as written: [its sweep copies]}``.
        n_layers: the LLM's layers, for the accounting of methods that act inside it.

    Columns: `COLUMNS`. ``tokens`` is the budget in tokens of the baseline's mean visual tokens (``keep`` applied
    as `Budget.counts` does); ``equivalent_tokens`` the visual tokens the condition's LLM layers held, averaged
    over layers, as measured (a method that prunes inside the LLM counts its early full layers);
    ``paper_tokens`` and ``accounting`` the count the method's paper reports and how (the intervention's own
    ``accounting(n_visual, n_layers)``; for a method without one, the measured mean, said so);
    ``retention`` is accuracy as a percentage of the baseline's; ``p_*`` are the paired tests' p-values
    (McNemar for accuracies, sign-flip for log-probs); ``prefill_speedup`` is the baseline's prefill time over
    the condition's; ``gflops`` analytic prefill FLOPs (`embedlens.metrics.prefill_flops`).
    """
    cells = budget_cells(conditions)
    swept = {m for members in sweeps.values() for m in members}
    controls_at_budget = any(getattr(type(c.interventions[0]), "budget_control", False) for c in conditions if c.name in cells)
    # a budget study: budgets swept, or a random control at a budget; a lone `fastv` among other conditions is not one
    if not cells or concl is None or not (controls_at_budget or swept & set(cells)):
        return None
    by_name = {c.name: c.interventions[0] for c in conditions if c.name in cells}
    controls = concl.controls
    rows = concl.rows
    index = {(c, r, m): i for i, (c, r, m, by) in enumerate(zip(rows["condition"], rows["reference"], rows["metric"], rows["by"])) if by == "all"}

    def cell(cond: str, ref: str, metric: str | None, col: str) -> float:
        i = index.get((cond, ref, metric)) if metric else None
        return NAN if i is None else float(rows[col][i])

    # the answer's accuracy: forced choice's or generation's where the plan has them (answer_logprob's `rank` can be
    # 0/1 on a small run, which makes it look like an accuracy)
    preferred = [m for m in ("correct", "exact", "contains") if m in concl.accuracy]
    acc = (preferred or [m for m in concl.accuracy if m != "rank"] or [None])[0]
    lp = "logprob" if "logprob" in concl.metrics else None  # the answer_logprob metric's column
    out: dict[str, list[Any]] = {k: [] for k in COLUMNS}
    order = sorted(cells, key=lambda c: (_method(c, sweeps), -_as_tokens(cells[c], 1_000_000)))
    for cond in order:
        keep, m = cells[cond], means.get(cond, {})
        ctrl = controls.get(cond, "")
        n_base = m.get("visual_tokens_mean_base", NAN)
        a, a_base = cell(cond, "baseline", acc, "mean"), cell(cond, "baseline", acc, "mean_reference")
        base_ms, ms = m.get("prefill_ms_base", NAN), m.get("prefill_ms", NAN)
        row = {
            "method": _method(cond, sweeps), "condition": cond, "keep": float(keep),
            # per frame of a video, the budget in tokens depends on the frames: no single count per image
            "tokens": _as_tokens(keep, n_base) if math.isfinite(n_base) and budget_per(by_name[cond]) == "image" else NAN,
            "random": ctrl, "metric": acc or "",
            "accuracy": a, "accuracy_base": a_base,
            "retention": 100.0 * a / a_base if a_base and math.isfinite(a_base) and a_base > 0 else NAN,
            "p_baseline": cell(cond, "baseline", acc, "p_value"),
            "accuracy_random": cell(cond, ctrl, acc, "mean_reference") if ctrl else NAN,
            "p_random": cell(cond, ctrl, acc, "p_value") if ctrl else NAN,
            "logprob": cell(cond, "baseline", lp, "mean"), "logprob_diff": cell(cond, "baseline", lp, "diff"),
            "logprob_p_baseline": cell(cond, "baseline", lp, "p_value"),
            "logprob_p_random": cell(cond, ctrl, lp, "p_value") if ctrl else NAN,
            "equivalent_tokens": m.get("visual_tokens_mean", NAN),
            **_accounting(by_name[cond], n_base, m.get("visual_tokens_mean", NAN), n_layers),
            "prefill_ms": ms, "prefill_ms_base": base_ms,
            "prefill_speedup": base_ms / ms if ms and math.isfinite(ms) and ms > 0 else NAN,
            "select_ms": m.get("select_ms", NAN),
            "gflops": m.get("flops", NAN) / 1e9, "gflops_base": m.get("flops_base", NAN) / 1e9,
            "peak_mem_mb": m.get("peak_mem_mb", NAN),
        }
        for k in COLUMNS:
            out[k].append(row[k])
    return out


def _accounting(iv, n_base: float, measured: float, n_layers: int | None) -> dict[str, Any]:
    """The paper's token count of one cell and its rule, from the intervention's `accounting` where it has one
    (else the measured mean over layers, said so)."""
    n = int(round(n_base)) if math.isfinite(n_base) else 0
    if budget_per(iv) == "frame":  # a method's accounting counts one image's schedule; frame by frame it has no such count
        return {"paper_tokens": measured, "accounting": "budget per frame: the measured visual tokens per layer, averaged over layers"}
    if hasattr(iv, "accounting") and n > 0 and n_layers:
        acc = iv.accounting(n, n_layers)
        return {"paper_tokens": float(acc["equivalent_tokens"]), "accounting": str(acc["rule"])}
    return {"paper_tokens": measured, "accounting": "no accounting of its own: the measured visual tokens per layer, averaged over layers"}


def _as_tokens(keep: int | float, n: float) -> int:
    """The budget in tokens of an image of `n` (rounded) visual tokens."""
    import torch

    n_img = int(round(n))
    return int(Budget(keep).counts(torch.tensor(n_img)).item()) if n_img > 0 else 0


def accuracy_figure(table: dict[str, list[Any]], path: str | Path, confidence: float = 0.95) -> Path:
    """Accuracy against tokens kept per image, one line per method; random drawn thick and dashed in black, the
    baseline as a horizontal line; integer ticks at the budgets."""
    from embedlens.figures import _plt, _save, _wrap

    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    methods = list(dict.fromkeys(table["method"]))
    random_methods = {table["method"][i] for i, c in enumerate(table["condition"]) if c in set(table["random"])}
    ticks: set[int] = set()
    # a colour and a marker per method: a dozen methods outrun any one palette
    palette = plt.get_cmap("tab10").colors
    markers = ("o", "^", "D", "v", "P", "X", "<")  # 7 against 10 colours: no pair repeats before 70 methods
    # tokens per image need the baseline's visual token count (the visual_tokens metric); without it, the keep values
    by_tokens = all(isinstance(t, (int, float)) and math.isfinite(t) for t in table["tokens"])
    x_col = "tokens" if by_tokens else "keep"
    others = [m for m in methods if m not in random_methods]
    for meth in [*others, *[m for m in methods if m in random_methods]]:
        idx = sorted((i for i, mm in enumerate(table["method"]) if mm == meth), key=lambda i: table[x_col][i])
        xs = [table[x_col][i] for i in idx]
        ys = [table["accuracy"][i] for i in idx]
        ticks |= {x for x in xs if by_tokens}
        if meth in random_methods:
            ax.plot(xs, ys, color="black", lw=2.8, ls="--", marker="s", ms=7, label=f"{meth} (the control)", zorder=5)
        else:
            j = others.index(meth)
            ax.plot(xs, ys, color=palette[j % len(palette)], lw=1.5, marker=markers[j % len(markers)], ms=6, label=meth, alpha=0.9)
    base = [v for v in table["accuracy_base"] if isinstance(v, float) and math.isfinite(v)]
    if base:
        ax.axhline(base[0], color="#2ca02c", lw=1.4, ls=":", label="baseline (every token)")
    if ticks:
        ax.set_xticks(sorted(ticks))
        ax.set_xticklabels([str(int(t)) for t in sorted(ticks)])
    ax.set_ylim(0, 1.03)
    ax.set_xlabel("visual tokens kept per image (budget)" if by_tokens else "keep (budget; add the visual_tokens metric for token counts)")
    ax.set_ylabel(f"accuracy ({table['metric'][0]})" if table["metric"] and table["metric"][0] else "accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method", title_fontsize=8, frameon=False)
    ax.set_title(_wrap("Token reduction: accuracy at each budget (one line per method; random: black dashed)", 7.0), fontsize=10)
    return _save(fig, path)

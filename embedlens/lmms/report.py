"""The benchmark section of an ``embedlens eval`` report and its chart: each task's metrics per condition,
beside the baseline, with the paired per-sample difference where the metric is a mean of per-sample scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from embedlens.report import esc, figure_html, table_html


def benchmarks_html(run: Path, bench: dict[str, Any], figures: Sequence[str | Path]) -> str:
    """HTML of the section: the task x condition x metric table, then the chart.

    Args:
        run: the run folder (figures are read only inside it).
        bench: ``summary.json``'s ``benchmarks`` entry (tasks, conditions, limit, documents, rows).
        figures: the chart files, relative to `run` (as the manifest lists them).
    """
    from embedlens.files import contained

    rows = bench.get("rows", [])
    docs = bench.get("documents", {})
    head = (f'<p class="note">lmms-eval tasks {esc(", ".join(bench.get("tasks", [])))}; conditions '
            f'{esc(", ".join(bench.get("conditions", [])))}; documents per task '
            f'{esc(", ".join(f"{t}: {n}" for t, n in docs.items()))}'
            + (f' (limit {esc(bench.get("limit"))})' if bench.get("limit") is not None else "") + ". "
            "diff = value - baseline; paired = mean per-sample difference to the baseline over the same documents "
            "(shown where the metric is the mean of per-sample scores), with its standard error.</p>")
    header = ["task", "metric", "condition", "value", "baseline", "diff", "paired diff", "paired s.e.", "pairs"]
    body = [[_cell(r[k]) for k in ("task", "metric", "condition", "value", "baseline", "diff", "paired_diff", "paired_sem", "paired_n")]
            for r in rows]
    notes = metric_notes(rows)
    header.append("note")
    for b, r in zip(body, rows):
        b.append(notes.get((r["task"], r["metric"], r["condition"]), ""))
    changed = [r["condition"] != "baseline" and r["diff"] is not None and abs(r["diff"]) > 0 for r in rows]
    figs = "".join(figure_html(contained(run, f), Path(f).name) for f in figures)
    return head + table_html(header, body, highlight=changed) + f'<div class="figs">{figs}</div>'


def metric_notes(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """``{(task, metric, condition): note}``: why a metric says nothing (the same value, or 0, under every condition)
    and why a row has no paired difference.

    Example:
        >>> rows = [{"task": "pope", "metric": "pope_accuracy", "condition": c, "value": 0.0, "paired_n": 0} for c in ("baseline", "prune")]
        >>> metric_notes(rows)[("pope", "pope_accuracy", "prune")].split(";")[0]
        '0 under every condition: the model never gives the answer the task scores (e.g. a colour where yes/no is asked)'
    """
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["task"], r["metric"]), []).append(r)
    out: dict[tuple[str, str, str], str] = {}
    for (task, metric), rs in by.items():
        vals = {r["value"] for r in rs if r["value"] is not None}
        note = ""
        if len(vals) == 1 and len(rs) > 1:
            v = next(iter(vals))
            note = ("0 under every condition: the model never gives the answer the task scores (e.g. a colour where "
                    "yes/no is asked)" if v == 0 else f"{v:.4g} under every condition: the conditions change nothing this metric sees")
        for r in rs:
            why = ""
            if not r.get("paired_n") and r["condition"] != "baseline":
                why = ("no paired difference: every document scores the same under every condition" if len(vals) == 1 else
                       "no paired difference: lmms-eval aggregates this metric over the whole set (not a mean of "
                       "per-document scores, e.g. precision, recall, F1, yes ratio), so it has no per-document value to pair")
            out[(task, metric, r["condition"])] = "; ".join(x for x in (note, why) if x)
    return out


def _cell(v: Any) -> Any:
    return "" if v is None else v  # no paired statistic for this metric: an empty cell, not "None"


def benchmarks_chart(rows: Sequence[dict[str, Any]], conditions: Sequence[str], path: Path, controls: Sequence[str] = ()) -> Path | None:
    """One panel per task (its metrics on the x axis), one bar per condition; error bars: the paired
    standard error of the difference to the baseline. Returns the file, or None without rows.

    The legend follows the run reports': the baseline dark grey, matched random `controls` hatched."""
    if not rows:
        return None
    import io

    import matplotlib.pyplot as plt

    from embedlens.files import write_bytes

    fig = benchmarks_figure(rows, conditions, controls)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path


def benchmarks_figure(rows: Sequence[dict[str, Any]], conditions: Sequence[str], controls: Sequence[str] = ()):
    """The figure of `benchmarks_chart` (not saved): a panel per task."""
    import numpy as np

    from embedlens.figures import CONTROL_HATCH, _plt

    plt = _plt()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.5, 1.2 + 0.9 * len({r['metric'] for r in rows}) * len(conditions) / 2) * len(tasks), 3.6),
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(conditions))
    for ax, task in zip(axes[0], tasks):
        metrics = list(dict.fromkeys(r["metric"] for r in rows if r["task"] == task))
        x = np.arange(len(metrics))
        for k, cond in enumerate(conditions):
            vals, errs = [], []
            for m in metrics:
                r = next((r for r in rows if (r["task"], r["condition"], r["metric"]) == (task, cond, m)), None)
                vals.append(np.nan if r is None else r["value"])
                errs.append(0.0 if r is None or r["paired_sem"] is None else r["paired_sem"])
            ax.bar(x + (k - (len(conditions) - 1) / 2) * width, vals, width, yerr=errs, capsize=2, label=cond,
                   color="#555555" if cond == "baseline" else colours(k % 10), hatch=CONTROL_HATCH if cond in controls else None,
                   edgecolor="white")
        ax.set_xticks(x, [m.replace("pope_", "") for m in metrics], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("metric", fontsize=8)
        ax.set_ylabel(f"{task} score per condition", fontsize=8)
        ax.set_title(task, fontsize=10)
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7, loc="best", title="condition (hatched: matched random control)", title_fontsize=7)
    fig.suptitle("lmms-eval scores per condition (dark grey: baseline; hatched: matched random control; "
                 "error bars: paired s.e. of the difference to baseline)", fontsize=9)
    fig.tight_layout()
    return fig

"""What a run's intervention effects support: each condition against its matched control and the baseline.

From the per-sample ``effects`` table (one row per sample and condition) and
the ``touched_tokens`` table (which visual tokens each condition removed,
masked or replaced), this builds the ``effect_tests`` table: for every
condition, metric and reference (``baseline``, or the condition's matched
random control) the paired difference on the same samples with a bootstrap
interval and a paired test (`embedlens.stats`), overall and broken down by a
sample field (the data's ``type``; ``report.breakdown`` in a plan). It also
finds the reference lines (baseline; a "blind" condition that removed every
visual token) and the sweeps whose conditions remove different numbers of
tokens, and draws the figures the report shows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedlens.stats import bootstrap_ci, is_binary, paired, seed_for

if TYPE_CHECKING:
    from embedlens.data import Record
    from embedlens.plan.loader import LoadedPlan
    from embedlens.plan.schema import ReportSpec

#: Fields a breakdown takes by default, the first one the data has (``qtype``: the synthetic data set's).
DEFAULT_BREAKDOWN = ("type", "qtype")
COLUMNS = ("condition", "reference", "metric", "by", "group", "n", "mean", "mean_ci_low", "mean_ci_high", "mean_reference",
           "diff", "diff_ci_low", "diff_ci_high", "test", "p_value", "x_only", "reference_only", "tokens_touched")
_ID_COLUMNS = ("sample", "condition")
METHOD = {
    "interval": "percentile bootstrap of the mean paired difference (samples resampled with replacement)",
    "accuracy_test": "exact McNemar test (two-sided binomial test, p = 1/2, on the discordant pairs)",
    "continuous_test": "paired sign-flip permutation test of the mean difference (exact up to 16 non-zero differences, else sampled)",
    "p_values": "unadjusted for multiple comparisons",
    "accuracy": "a metric whose every value is 0 or 1",
}


def breakdown_fields(loaded: "LoadedPlan", records: "list[Record]") -> list[str]:
    """The sample fields accuracies are broken down by, checked against the data.

    Raises:
        PlanError: at ``report.breakdown[i]`` for a field no sample has, or one holding lists or mappings.
    """
    spec = loaded.plan.report
    have = {k for r in records for k in r.meta}
    if spec.breakdown is None:
        return [f for f in DEFAULT_BREAKDOWN if f in have][:1]
    for i, f in enumerate(spec.breakdown):
        if f not in have:
            shown = ", ".join(sorted(k for k in have if _scalar_field(records, k))) or "none"
            raise loaded.error(("report", "breakdown", i), f"no sample has a field {f!r}; scalar fields the samples have: {shown}")
        if not _scalar_field(records, f):
            raise loaded.error(("report", "breakdown", i), f"field {f!r} holds lists or mappings; a breakdown needs one value "
                               "(a string, number or boolean) per sample")
    return list(dict.fromkeys(spec.breakdown))


def _scalar_field(records: "list[Record]", name: str) -> bool:
    return all(isinstance(r.meta.get(name), (str, int, float, bool)) or r.meta.get(name) is None for r in records)


def sweep_groups(loaded: "LoadedPlan") -> dict[str, list[str]]:
    """``{condition as written: [its sweep copies, in order]}`` for swept conditions."""
    out: dict[str, list[str]] = {}
    for key, target in loaded.aliases.items():
        if len(key) == 2 and key[0] == "conditions" and target[0] == "conditions" and key[1] in loaded.plan.conditions:
            out.setdefault(target[1], []).append(key[1])
    return out


@dataclass
class Conclusions:
    """The effect tests of a run and what the report draws from them."""

    rows: dict[str, list] = field(default_factory=lambda: {c: [] for c in COLUMNS})
    accuracy: list[str] = field(default_factory=list)  # binary metrics
    metrics: list[str] = field(default_factory=list)  # every tested metric, accuracies first
    conditions: list[str] = field(default_factory=list)
    controls: dict[str, str] = field(default_factory=dict)
    blind: str | None = None
    breakdown: list[str] = field(default_factory=list)
    sweeps: dict[str, list[str]] = field(default_factory=dict)  # only those varying the tokens touched
    touched: dict[str, float] = field(default_factory=dict)  # condition -> mean visual tokens acted on per sample
    spec: dict[str, Any] = field(default_factory=dict)

    def find(self, condition: str, reference: str, metric: str, by: str = "all", group: str = "all") -> dict | None:
        """One row of the table as a dict, or None."""
        for i in range(len(self.rows["condition"])):
            if (self.rows["condition"][i], self.rows["reference"][i], self.rows["metric"][i], self.rows["by"][i], self.rows["group"][i]) == (
                condition, reference, metric, by, group
            ):
                return {c: self.rows[c][i] for c in COLUMNS}
        return None

    def headline(self) -> dict[str, Any]:
        """The overall numbers of every accuracy metric (for summary.json and the console)."""
        out: dict[str, Any] = {"method": {**METHOD, **self.spec}, "accuracy_metrics": self.accuracy, "blind": self.blind,
                               "breakdown": self.breakdown, "sweeps": self.sweeps, "baseline": {}, "conditions": {}}
        for m in self.accuracy:
            b = self.find("baseline", "", m)
            if b is not None:
                out["baseline"][m] = {"mean": b["mean"], "ci": [b["mean_ci_low"], b["mean_ci_high"]], "n": b["n"]}
        for c in self.conditions:
            entry: dict[str, Any] = {"tokens_touched": self.touched.get(c, 0.0)}
            for m in self.accuracy:
                base = self.find(c, "baseline", m)
                if base is None:
                    continue
                e = {"mean": base["mean"], "ci": [base["mean_ci_low"], base["mean_ci_high"]], "n": base["n"],
                     "vs_baseline": _short(base)}
                ctrl = self.controls.get(c)
                row = self.find(c, ctrl, m) if ctrl else None
                if row is not None:
                    e["vs_control"] = {"control": ctrl, **_short(row)}
                entry[m] = e
            out["conditions"][c] = entry
        return out


def _short(row: dict) -> dict:
    return {"diff": row["diff"], "ci": [row["diff_ci_low"], row["diff_ci_high"]], "p": row["p_value"], "test": row["test"]}


def _numeric(values: list) -> bool:
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values
    )


def _floats(values: list) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def analyse(
    effects: dict[str, list],
    touched: dict[str, list] | None,
    controls: dict[str, str],
    spec: "ReportSpec",
    seed: int,
    groups: dict[str, dict[str, Any]] | None = None,
    sweeps: dict[str, list[str]] | None = None,
) -> Conclusions:
    """Paired comparisons of every condition with the baseline and with its matched control.

    Args:
        effects: the ``effects`` table (columns ``sample``, ``condition``, metric columns, baseline
            columns suffixed ``_base``).
        touched: the ``touched_tokens`` table (`embedlens.interventions.touched`), or None.
        controls: ``{condition: its matched random control}``.
        spec: the plan's ``report`` section (resamples, confidence).
        seed: the run's seed; each comparison draws from `seed_for(seed, its names)`.
        groups: ``{field: {sample id: value}}`` to break accuracies down by.
        sweeps: ``{condition as written: [its sweep copies]}``.
    """
    groups = groups or {}
    out = Conclusions(controls=dict(controls), breakdown=list(groups),
                      spec={"resamples": spec.resamples, "confidence": spec.confidence, "seed": seed})
    conds = list(dict.fromkeys(effects.get("condition", [])))
    out.conditions = conds
    index: dict[str, dict[str, int]] = {c: {} for c in conds}
    for i, (s, c) in enumerate(zip(effects.get("sample", []), effects.get("condition", []))):
        index[c].setdefault(str(s), i)
    cols = {k: v for k, v in effects.items() if k not in _ID_COLUMNS and not re.search(r"_l\d+$", k) and _numeric(v)}
    metrics = [k for k in cols if not k.endswith("_base")]
    out.accuracy = [m for m in metrics if is_binary(_floats(cols[m]))]
    out.metrics = out.accuracy + [m for m in metrics if m not in out.accuracy]
    # what each condition acted on, and which condition removed every visual token
    removed: dict[tuple[str, str], int] = {}
    count: dict[tuple[str, str], int] = {}
    n_visual: dict[str, int] = {}
    if touched:
        for c, s, a, nv in zip(touched["condition"], touched["sample_id"], touched["action"], touched["n_visual"]):
            count[(c, s)] = count.get((c, s), 0) + 1
            removed[(c, s)] = removed.get((c, s), 0) + (a == "removed")
            n_visual[s] = int(nv)
    for c in conds:
        samples = list(index[c])
        out.touched[c] = float(np.mean([count.get((c, s), 0) for s in samples])) if samples else 0.0
        if out.blind is None and samples and all(n_visual.get(s, 0) > 0 and removed.get((c, s), 0) == n_visual[s] for s in samples):
            out.blind = c
    for base, members in (sweeps or {}).items():
        present = [m for m in members if m in index]
        if len(present) > 1 and len({round(out.touched[m], 9) for m in present}) > 1:
            out.sweeps[base] = present

    def column(c: str, name: str, samples: list[str]) -> np.ndarray:
        vals = cols.get(name)
        return _floats([vals[index[c][s]] if vals is not None else None for s in samples])

    def add(cond: str, ref: str, m: str, by: str, group: str, x: np.ndarray, y: np.ndarray | None, binary: bool) -> None:
        if y is None:
            keep = np.isfinite(x)
            r = None
        else:
            keep = np.isfinite(x) & np.isfinite(y)
            r = paired(x[keep], y[keep], binary, spec.resamples, spec.confidence, seed_for(seed, cond, ref, m, by, group))
        xs = x[keep]
        lo, hi = bootstrap_ci(xs, spec.resamples, spec.confidence, seed_for(seed, cond, m, by, group, "mean"))
        nan = math.nan
        row = {"condition": cond, "reference": ref, "metric": m, "by": by, "group": group, "n": int(keep.sum()),
               "mean": float(xs.mean()) if xs.size else nan, "mean_ci_low": lo, "mean_ci_high": hi,
               "mean_reference": r.mean_reference if r else nan, "diff": r.diff if r else nan,
               "diff_ci_low": r.diff_ci_low if r else nan, "diff_ci_high": r.diff_ci_high if r else nan,
               "test": r.test if r else "", "p_value": r.p_value if r else nan, "x_only": r.x_only if r else -1,
               "reference_only": r.reference_only if r else -1, "tokens_touched": out.touched.get(cond, 0.0)}
        for k in COLUMNS:
            out.rows[k].append(row[k])

    slices: list[tuple[str, str, set[str] | None]] = [("all", "all", None)]
    for f, values in groups.items():
        for g in sorted({str(v) for v in values.values() if v is not None}):
            slices.append((f, g, {s for s, v in values.items() if v is not None and str(v) == g}))
    for by, group, keep in slices:
        for m in out.metrics if by == "all" else out.accuracy:
            binary = m in out.accuracy
            if f"{m}_base" in cols:  # the baseline's own value on the samples the conditions saw
                first: dict[str, str] = {}
                for c in conds:
                    for s in index[c]:
                        first.setdefault(s, c)
                samples = [s for s in first if keep is None or s in keep]
                if samples:
                    add("baseline", "", m, by, group, _floats([cols[f"{m}_base"][index[first[s]][s]] for s in samples]), None, binary)
            for c in conds:
                samples = [s for s in index[c] if keep is None or s in keep]
                if not samples:
                    continue
                x = column(c, m, samples)
                if f"{m}_base" in cols:
                    add(c, "baseline", m, by, group, x, column(c, f"{m}_base", samples), binary)
                ctrl = controls.get(c)
                if ctrl in index:
                    both = [s for s in samples if s in index[ctrl]]
                    if both:
                        add(c, ctrl, m, by, group, column(c, m, both), column(ctrl, m, both), binary)
                if f"{m}_base" not in cols and not (ctrl in index):
                    add(c, "", m, by, group, x, None, binary)
    return out


def figures(c: Conclusions, fig_dir: Path, token_maps: list[dict] | None = None) -> list[Path]:
    """The report's figures of the effect tests: accuracies with intervals and reference lines, paired
    differences, per-group accuracies, sweep curves, and token maps of what each condition removed."""
    from embedlens.figures import accuracy_chart, breakdown_heatmap, paired_differences, removal_maps, safe_name, sweep_curve

    out: list[Path] = []
    for m in c.accuracy:
        out.append(accuracy_chart(c, m, fig_dir / f"effects_{safe_name(m)}.png"))
        out.append(paired_differences(c, m, fig_dir / f"effects_paired_{safe_name(m)}.png"))
        for by in c.breakdown:
            out.append(breakdown_heatmap(c, m, by, fig_dir / f"effects_by_{safe_name(by)}_{safe_name(m)}.png"))
        for base in c.sweeps:
            out.append(sweep_curve(c, m, base, fig_dir / f"effects_sweep_{safe_name(base)}_{safe_name(m)}.png"))
    for tm in token_maps or []:
        out.append(removal_maps(tm, fig_dir / f"removed_{safe_name(tm['condition'])}.png"))
    return out


def token_map_panels(c: Conclusions, touched: dict[str, list] | None, adapter, records: "list[Record]", n: int, max_pixels: int) -> list[dict]:
    """What `removal_maps` draws: per condition with a control (and the others that acted on tokens), the
    first `n` samples' first image with the tokens the condition and its control acted on."""
    if not touched or not records:
        return []
    from embedlens.errors import InputError
    from embedlens.probes._util import display_pixels

    samples = []
    for r in records:
        if len(samples) >= n:
            break
        try:
            s, _ = r.load(max_pixels)
        except InputError:
            continue
        samples.append(s)
    if not samples:
        return []
    batch = adapter.encode(samples)
    vt = batch.roles.visual_tokens()
    images = []
    for b, s in enumerate(samples):
        sel = ((vt["sample"] == b) & (vt["image"] == 0) & (vt["tile"] == 0)).nonzero().flatten().tolist()
        if not sel:
            continue
        images.append({"sample_id": s.id, "pixels": display_pixels(adapter, batch.inputs, int(vt["feature_row"][sel[0]]), image=int(vt["image"][sel[0]])),
                       "row": [int(vt["row"][i]) for i in sel], "col": [int(vt["col"][i]) for i in sel]})
    ids = {im["sample_id"] for im in images}
    acted: dict[str, dict[str, dict[tuple[int, int], str]]] = {}
    for cond, s, a, img, tile, row, col in zip(touched["condition"], touched["sample_id"], touched["action"], touched["image"],
                                               touched["tile"], touched["row"], touched["col"]):
        if s in ids and img == 0 and tile == 0:
            acted.setdefault(cond, {}).setdefault(s, {})[(int(row), int(col))] = a
    is_control = set(c.controls.values())
    out = []
    for cond in c.conditions:
        if cond in is_control or cond == c.blind or cond not in acted:
            continue
        ctrl = c.controls.get(cond)
        rows = [(cond, acted.get(cond, {}))] + ([(ctrl, acted.get(ctrl, {}))] if ctrl else [])
        out.append({"condition": cond, "images": images, "rows": rows})
    return out

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

from embedlens.stats import MIN_N, POWER, alpha_of, bca_ci, holm, is_binary, mcnemar_min_discordant, paired, power_note, seed_for, wilson_interval

if TYPE_CHECKING:
    from embedlens.data import Record
    from embedlens.plan.loader import LoadedPlan
    from embedlens.plan.schema import ReportSpec

#: Fields a breakdown takes by default, the first one the data has (``qtype``: the synthetic data set's).
DEFAULT_BREAKDOWN = ("type", "qtype")
COLUMNS = ("condition", "reference", "metric", "by", "group", "n", "mean", "mean_ci_low", "mean_ci_high", "mean_reference",
           "diff", "diff_ci_low", "diff_ci_high", "test", "p_value", "p_holm", "mde", "x_only", "reference_only", "tokens_touched",
           "overlap", "verdict")
_ID_COLUMNS = ("sample", "condition")
METHOD = {
    "interval": "BCa bootstrap (bias-corrected and accelerated) of the mean paired difference (samples resampled with replacement)",
    "mean_interval": "Wilson score interval for an accuracy; BCa bootstrap of the mean for other metrics",
    "accuracy_test": "exact McNemar test (two-sided binomial test, p = 1/2, on the discordant pairs)",
    "continuous_test": "paired sign-flip permutation test of the mean difference (exact up to 16 non-zero differences, else sampled)",
    "deterministic": "a metric whose paired difference is the same on every sample is not tested (test: deterministic)",
    "p_values": "raw, and Holm-adjusted (p_holm) across the plan's overall comparisons (a breakdown's rows: across that breakdown)",
    "mde": f"minimum detectable effect: the smallest true difference the test finds with power {POWER} at level 1 - report.confidence, at the run's n",
    "min_n": f"below {MIN_N} samples a bootstrap interval is approximate: decide with the exact test",
    "overlap": "a matched control's tokens that its condition also acted on (share per sample, averaged)",
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
    overlap: dict[str, float] = field(default_factory=dict)  # control -> share of its tokens its condition also acted on
    warnings: list[str] = field(default_factory=list)
    map_samples: list[str] = field(default_factory=list)  # the samples the token maps draw
    descriptive: list[str] = field(default_factory=list)  # metrics described, not tested (Metric.descriptive)
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
                               "breakdown": self.breakdown, "sweeps": self.sweeps, "warnings": self.warnings,
                               "control_overlap": self.overlap, "token_map_samples": self.map_samples, "baseline": {},
                               "conditions": {}}
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
                    e["vs_control"] = {"control": ctrl, "overlap": row["overlap"], **_short(row)}
                entry[m] = e
            out["conditions"][c] = entry
        return out


def _short(row: dict) -> dict:
    return {"diff": row["diff"], "ci": [row["diff_ci_low"], row["diff_ci_high"]], "p": row["p_value"], "p_holm": row["p_holm"],
            "mde": row["mde"], "test": row["test"], "verdict": row["verdict"]}


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
    descriptive: set[str] | None = None,
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
        descriptive: metric columns that record what a condition did (`Metric.descriptive`): means, no test.
    """
    groups = groups or {}
    descriptive = set(descriptive or ())
    out = Conclusions(controls=dict(controls), breakdown=list(groups),
                      spec={"resamples": spec.resamples, "confidence": spec.confidence, "seed": seed})
    conds = list(dict.fromkeys(effects.get("condition", [])))
    out.conditions = conds
    out.descriptive = sorted(descriptive)
    index: dict[str, dict[str, int]] = {c: {} for c in conds}
    for i, (s, c) in enumerate(zip(effects.get("sample", []), effects.get("condition", []))):
        index[c].setdefault(str(s), i)
    cols = {k: v for k, v in effects.items() if k not in _ID_COLUMNS and not re.search(r"_l\d+$", k) and _numeric(v)}
    # X_delta of a metric with X and X_base is X minus the baseline again: the same test twice
    metrics = [k for k in cols if not k.endswith("_base")
               and not (k.endswith("_delta") and k[: -len("_delta")] in cols and f"{k[: -len('_delta')]}_base" in cols)]
    # an accuracy is 0/1 under every condition AND at the baseline: a count that a condition drives to 0/1 (every
    # visual token removed) is still a count, and its baseline column must not be read as successes
    out.accuracy = [m for m in metrics if is_binary(np.concatenate([_floats(cols[m]), _floats(cols.get(f"{m}_base", []))]))]
    out.metrics = out.accuracy + [m for m in metrics if m not in out.accuracy]
    # what each condition acted on, and which condition removed every visual token
    removed: dict[tuple[str, str], int] = {}
    count: dict[tuple[str, str], int] = {}
    n_visual: dict[str, int] = {}
    acted: dict[tuple[str, str], set] = {}
    if touched:
        for c, s, a, nv, ti in zip(touched["condition"], touched["sample_id"], touched["action"], touched["n_visual"], touched["index"]):
            count[(c, s)] = count.get((c, s), 0) + 1
            removed[(c, s)] = removed.get((c, s), 0) + (a == "removed")
            n_visual[s] = int(nv)
            acted.setdefault((c, s), set()).add(int(ti))
    out.overlap = control_overlap(acted, controls)
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
        if binary:
            lo, hi = wilson_interval(int(xs.sum()), int(xs.size), spec.confidence)
        else:
            lo, hi = bca_ci(xs, spec.resamples, spec.confidence, seed_for(seed, cond, m, by, group, "mean"))
        nan = math.nan
        row = {"condition": cond, "reference": ref, "metric": m, "by": by, "group": group, "n": int(keep.sum()),
               "mean": float(xs.mean()) if xs.size else nan, "mean_ci_low": lo, "mean_ci_high": hi,
               "mean_reference": r.mean_reference if r else nan, "diff": r.diff if r else nan,
               "diff_ci_low": r.diff_ci_low if r else nan, "diff_ci_high": r.diff_ci_high if r else nan,
               "test": r.test if r else "", "p_value": r.p_value if r else nan, "p_holm": nan, "mde": r.mde if r else nan,
               "x_only": r.x_only if r else -1, "reference_only": r.reference_only if r else -1,
               "tokens_touched": out.touched.get(cond, 0.0),
               "overlap": out.overlap.get(ref, nan) if ref and controls.get(cond) == ref else nan, "verdict": ""}
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
                if m in descriptive:
                    add(c, "", m, by, group, x, None, binary)
                    continue
                if f"{m}_base" in cols:
                    add(c, "baseline", m, by, group, x, column(c, f"{m}_base", samples), binary)
                ctrl = controls.get(c)
                if ctrl in index:
                    both = [s for s in samples if s in index[ctrl]]
                    if both:
                        add(c, ctrl, m, by, group, column(c, m, both), column(ctrl, m, both), binary)
                if f"{m}_base" not in cols and not (ctrl in index):
                    add(c, "", m, by, group, x, None, binary)
    _adjust_and_say(out, spec)
    return out


def control_overlap(acted: dict[tuple[str, str], set], controls: dict[str, str]) -> dict[str, float]:
    """``{control: mean over samples of |control's tokens & its condition's| / |control's tokens|}``: how much of a
    matched control is its own target (0 with ``exclude_target: true``); samples where the control acted on no
    token are left out (NaN when there are none)."""
    out = {}
    for cond, ctrl in controls.items():
        shares = [len(toks & acted.get((cond, s), set())) / len(toks) for (c, s), toks in acted.items() if c == ctrl and toks]
        out[ctrl] = float(np.mean(shares)) if shares else math.nan
    return out


def _adjust_and_say(out: Conclusions, spec: "ReportSpec") -> None:
    """Holm-adjusted p-values per family (the overall rows; each breakdown's rows), one plain sentence per row,
    and the run's warnings about sample size."""
    rows = out.rows
    n_rows = len(rows["condition"])
    p = np.array(rows["p_value"], dtype=np.float64)
    for by in dict.fromkeys(rows["by"]):
        idx = np.array([i for i in range(n_rows) if rows["by"][i] == by], dtype=np.int64)
        adj = holm(p[idx])
        for i, v in zip(idx.tolist(), adj.tolist()):
            rows["p_holm"][i] = v
    family = {by: sum(1 for i in range(n_rows) if rows["by"][i] == by and math.isfinite(p[i])) for by in set(rows["by"])}
    for i in range(n_rows):
        row = {c: rows[c][i] for c in COLUMNS}
        rows["verdict"][i] = verdict(row, row["metric"] in out.accuracy, spec.confidence, family.get(row["by"], 0))
        if not row["reference"] and row["condition"] != "baseline" and row["metric"] in out.descriptive:
            rows["verdict"][i] = "what the condition did, not an outcome: described by its mean, not tested"
    small = sorted({rows["n"][i] for i in range(n_rows) if rows["by"][i] == "all" and rows["reference"][i] and rows["n"][i] < MIN_N})
    if small:
        out.warnings.append(f"n = {small[0]} samples: below {MIN_N}, bootstrap intervals are approximate (decide with the exact "
                            "test), and only large effects can be detected (see the mde column)")
    need = getattr(spec, "min_effect", None)
    alpha = alpha_of(spec.confidence)
    for m in out.accuracy:
        mdes = [rows["mde"][i] for i in range(n_rows) if rows["metric"][i] == m and rows["by"][i] == "all" and rows["reference"][i]
                and not math.isnan(rows["mde"][i])]
        if need is not None and mdes and min(mdes) > need:
            n = max(rows["n"][i] for i in range(n_rows) if rows["metric"][i] == m and rows["by"][i] == "all")
            can = (f"the smallest detectable change is {min(mdes):.2f} (power {POWER}, level {alpha:g})" if math.isfinite(min(mdes))
                   else f"no change is detectable (the exact test cannot reach p < {alpha:g} below {mcnemar_min_discordant(alpha)} samples)")
            out.warnings.append(f"{m}: at n = {n} {can}; "
                                f"the question needs {need:.2f} (report.min_effect): a null result here is not evidence of no effect")


def verdict(row: dict, accuracy: bool, confidence: float = 0.95, family: int = 1) -> str:
    """One plain sentence on what a row of the effect tests supports.

    Example:
        >>> verdict({"reference": "baseline", "test": "mcnemar_exact", "n": 12, "diff": -0.0833, "diff_ci_low": -0.25,
        ...          "diff_ci_high": 0.0, "p_value": 0.5, "p_holm": 1.0, "mde": 0.654}, accuracy=True)
        'no evidence of an effect (p = 0.5); the interval allows a drop of up to 0.25; at n = 12 only a change of 0.654 or more is likely to be detected'
    """
    if not row.get("reference"):
        return ""
    n, d, lo, hi = row["n"], row["diff"], row["diff_ci_low"], row["diff_ci_high"]
    if n == 0:
        return "no sample has a value under both runs: nothing to compare"
    if row["test"] == "deterministic":
        return f"deterministic: the difference is {d:+.4g} on every one of the {n} samples; nothing varies to test"
    p, ph = row["p_value"], row["p_holm"]
    way = "drop" if d < 0 else "rise"
    alpha = alpha_of(confidence)  # the level that agrees with the interval printed beside it
    if math.isfinite(ph) and ph < alpha:
        holm_note = f", Holm-adjusted {ph:.2g} over {family} comparisons" if family > 1 else ""
        return f"evidence of a {way} of {abs(d):.3g} ({confidence * 100:g}% interval {lo:+.3g} to {hi:+.3g}; p = {p:.2g}{holm_note})"
    m = row.get("mde", math.nan)
    power = power_note(n, m, "change", alpha)
    if math.isfinite(p) and p < alpha:
        return (f"a {way} of {abs(d):.3g} (p = {p:.2g}) that does not survive the Holm adjustment over {family} comparisons "
                f"(adjusted p = {ph:.2g}): not evidence on its own{power}")
    allows = []
    if math.isfinite(lo) and lo < 0:
        allows.append(f"a drop of up to {-lo:.3g}")
    if math.isfinite(hi) and hi > 0:
        allows.append(f"a rise of up to {hi:.3g}")
    s = f"no evidence of an effect (p = {p:.2g})"
    if allows:
        s += "; the interval allows " + " and ".join(allows)
    return s + power


def figures(c: Conclusions, fig_dir: Path, token_maps: list[dict] | None = None) -> list[Path]:
    """The report's figures of the effect tests: accuracies with intervals and reference lines, paired
    differences, per-group accuracies, sweep curves, and token maps of what each condition removed."""
    from embedlens.conclusion_figures import accuracy_chart, breakdown_heatmap, paired_differences, sweep_curve
    from embedlens.figures import removal_maps, safe_name

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


def token_map_panels(c: Conclusions, touched: dict[str, list] | None, adapter, records: "list[Record]", n: int, max_pixels: int,
                     video=None) -> list[dict]:
    """What `removal_maps` draws: per condition with a control (and the others that acted on tokens), the
    first `n` samples' first image with the tokens the condition and its control acted on. A video sample is
    drawn frame by frame (one panel per frame, i.e. temporal patch, with that frame's tokens), as the probes'
    token maps; the first video is kept whole, a later one only if all its frames fit `n` panels."""
    if not touched or not records:
        return []
    from embedlens.errors import InputError
    from embedlens.probes._util import batch_image, display_pixels

    samples = []
    for r in records:
        if len(samples) >= n:
            break
        try:
            s, _ = r.load(max_pixels, video)
        except InputError:
            continue
        if samples and (s.video is None) != (samples[0].video is None):
            continue  # one batch holds images or videos (Qwen-VL): the maps show the first sample's kind
        samples.append(s)
    if not samples:
        return []
    batch = adapter.encode(samples)
    vt = batch.roles.visual_tokens()
    images = []
    for b, s in enumerate(samples):
        first = (vt["sample"] == b) & (vt["image"] == 0) & (vt["tile"] == 0)
        frames = sorted(set(vt["frame"][first].tolist()))  # [-1] off video; one sample's frames: few
        if not frames or (images and len(images) + len(frames) > n):
            continue
        for f in frames:
            sel = (first & (vt["frame"] == f)).nonzero().flatten().tolist()
            images.append({"sample_id": s.id, "key": _panel_key(s.id, f), "title": s.id if f < 0 else f"{s.id}, frame {f}",
                           "pixels": display_pixels(adapter, batch.inputs, int(vt["feature_row"][sel[0]]),
                                                    image=batch_image(batch, b, int(vt["image"][sel[0]])), frame=max(f, 0)),
                           "row": [int(vt["row"][i]) for i in sel], "col": [int(vt["col"][i]) for i in sel]})
    keys = {im["key"] for im in images}
    c.map_samples = list(dict.fromkeys(im["sample_id"] for im in images))
    acted: dict[str, dict[str, dict[tuple[int, int], str]]] = {}
    frames = touched.get("frame") or [-1] * len(touched["condition"])  # a table written before the frame column
    for cond, s, a, img, tile, row, col, frame in zip(touched["condition"], touched["sample_id"], touched["action"], touched["image"],
                                                      touched["tile"], touched["row"], touched["col"], frames):
        key = _panel_key(s, int(frame))
        if key in keys and img == 0 and tile == 0:
            acted.setdefault(cond, {}).setdefault(key, {})[(int(row), int(col))] = a
    is_control = set(c.controls.values())
    out = []
    for cond in c.conditions:
        if cond in is_control or cond == c.blind or cond not in acted:
            continue
        ctrl = c.controls.get(cond)
        rows = [(cond, acted.get(cond, {}))] + ([(ctrl, acted.get(ctrl, {}))] if ctrl else [])
        out.append({"condition": cond, "images": images, "rows": rows})
    return out


def _panel_key(sample_id: str, frame: int) -> str:
    """A removal map's panel: a sample (an image), or one frame of a video sample."""
    return str(sample_id) if frame < 0 else f"{sample_id}\x00frame {frame}"

"""Do the models differ? Paired tests of each intervention effect between two runs, over the samples both ran.

An effect of a condition on one sample is its metric minus the reference's on
that sample (the baseline's, or the matched control's). Two runs of one plan on
two models give each shared sample one effect per model; the difference
between the models is tested on those pairs, as `embedlens.stats.paired` tests
a condition against its reference: BCa bootstrap interval, sign-flip
permutation test (or ``deterministic`` when the difference is the same on every
sample), minimum detectable effect, Holm across the comparison's tests, and a
standardised difference (mean over standard deviation of the per-sample
differences) by which the comparisons are ordered.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from embedlens.errors import InputError
from embedlens.files import contained
from embedlens.stats import alpha_of, holm, paired, power_note, seed_for

#: Columns of ``compare_effects.csv``.
COLUMNS = ("condition", "reference", "metric", "n_shared", "effect_a", "effect_b", "diff", "diff_ci_low", "diff_ci_high", "test",
           "p_value", "p_holm", "mde", "standardised", "verdict")


def _effects_table(run: Path, manifest: dict) -> dict[str, list] | None:
    """A run's per-sample ``effects`` table (read only inside the run folder), or None."""
    from embedlens.report import read_rows

    rel = manifest.get("tables", {}).get("effects") if isinstance(manifest.get("tables"), dict) else None
    path = contained(run, rel) if isinstance(rel, str) else None
    if path is None:
        return None
    import csv

    import pyarrow

    try:
        rows = read_rows(path)
    except (OSError, ValueError, csv.Error, pyarrow.ArrowException) as e:  # UnicodeDecodeError is a ValueError
        raise InputError(f"{path}: the run's effects table cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    cols: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            cols.setdefault(k, []).append(v)
    return cols if "sample" in cols and "condition" in cols else None


def _per_sample(table: dict[str, list], controls: dict[str, str]) -> dict[tuple[str, str, str], dict[str, float]]:
    """``{(condition, reference, metric): {sample id: effect}}`` for every metric with a baseline column, against the
    baseline and against the condition's matched control."""
    def num(v: Any) -> float:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan

    metrics = [k[: -len("_base")] for k in table if k.endswith("_base") and k[: -len("_base")] in table]
    by_cond: dict[str, dict[str, int]] = {}
    for i, (s, c) in enumerate(zip(table["sample"], table["condition"])):
        by_cond.setdefault(str(c), {}).setdefault(str(s), i)
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for m in metrics:
        x, base = table[m], table[f"{m}_base"]
        for c, rows in by_cond.items():
            out[(c, "baseline", m)] = {s: num(x[i]) - num(base[i]) for s, i in rows.items()}
            ctrl = controls.get(c)
            if ctrl in by_cond:
                ref = by_cond[ctrl]
                out[(c, ctrl, m)] = {s: num(x[i]) - num(x[ref[s]]) for s, i in rows.items() if s in ref}
    return out


def model_differences(names: list[str], runs: list[Path], loaded: list[tuple[dict, dict]], resamples: int = 10_000,
                      confidence: float = 0.95, seed: int = 0) -> list[dict[str, Any]]:
    """Paired tests of each effect between the first run (a) and every other run (b), over shared sample ids.

    Returns one row per (other run, condition, reference, metric), ordered by the absolute standardised
    difference, largest first; ``[]`` when fewer than two runs have an effects table.
    """
    tables = [_effects_table(r, m) for r, (m, _) in zip(runs, loaded)]
    if tables[0] is None:
        return []
    a = _per_sample(tables[0], loaded[0][1].get("controls", {}) or {})
    out: list[dict[str, Any]] = []
    for j in range(1, len(runs)):
        if tables[j] is None:
            continue
        b = _per_sample(tables[j], loaded[j][1].get("controls", {}) or {})
        for key in a:
            if key not in b:
                continue
            shared = [s for s in a[key] if s in b[key]]
            ea = np.array([a[key][s] for s in shared], dtype=np.float64)
            eb = np.array([b[key][s] for s in shared], dtype=np.float64)
            keep = np.isfinite(ea) & np.isfinite(eb)
            if not keep.any():
                continue
            r = paired(ea[keep], eb[keep], binary=False, resamples=resamples, confidence=confidence,
                       seed=seed_for(seed, "compare", names[j], *key))
            d = ea[keep] - eb[keep]
            sd = float(np.std(d, ddof=1)) if d.size > 1 else 0.0
            out.append({"other": names[j], "condition": key[0], "reference": key[1], "metric": key[2], "n_shared": r.n,
                        "effect_a": r.mean, "effect_b": r.mean_reference, "diff": r.diff, "diff_ci_low": r.diff_ci_low,
                        "diff_ci_high": r.diff_ci_high, "test": r.test, "p_value": r.p_value, "p_holm": math.nan, "mde": r.mde,
                        "standardised": r.diff / sd if sd > 0 else (0.0 if r.diff == 0 else math.inf), "verdict": ""})
    adj = holm([row["p_value"] for row in out])
    for row, ph in zip(out, adj.tolist()):
        row["p_holm"] = ph
        row["verdict"] = _verdict(row, names[0], confidence)
    return sorted(out, key=lambda r: -abs(r["standardised"]) if math.isfinite(r["standardised"]) else -math.inf)


def _verdict(row: dict, a: str, confidence: float) -> str:
    n, d = row["n_shared"], row["diff"]
    if row["test"] == "deterministic":
        return f"deterministic: the effect differs by {d:+.4g} on every one of the {n} shared samples; nothing varies to test"
    p, ph = row["p_value"], row["p_holm"]
    alpha = alpha_of(confidence)  # the level that agrees with the interval printed beside it
    if math.isfinite(ph) and ph < alpha:
        way = "larger" if d > 0 else "smaller"
        return (f"the effect is {way} in {a} by {abs(d):.3g} ({confidence * 100:g}% interval {row['diff_ci_low']:+.3g} to "
                f"{row['diff_ci_high']:+.3g}; p = {p:.2g}, Holm {ph:.2g})")
    s = f"no evidence that the models differ (p = {p:.2g}, Holm {ph:.2g}); the interval allows {row['diff_ci_low']:+.3g} to {row['diff_ci_high']:+.3g}"
    return s + power_note(n, row["mde"], "difference", alpha)


def model_differences_html(rows: list[dict[str, Any]], names: list[str]) -> str:
    """The paired model-difference tests as a table, one plain sentence each."""
    from embedlens.report import esc

    if not rows:
        return ('<p class="note">No paired test: the runs have no per-sample effects table in common (a plan with '
                "conditions and metrics writes one).</p>")
    def f(v: Any, spec: str = "{:+.3g}") -> str:
        return spec.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else ""

    head = ["condition", "minus", "metric", "vs", "shared samples", f"effect in {names[0]}", "effect in the other", "difference",
            "95% interval", "p / Holm", "mde", "standardised", "what it supports"]
    body = []
    for r in rows:
        sig = math.isfinite(r["p_holm"]) and r["p_holm"] < 0.05
        cells = [esc(r["condition"]), esc(r["reference"]), esc(r["metric"]), esc(r["other"]), str(r["n_shared"]), f(r["effect_a"]),
                 f(r["effect_b"]), f(r["diff"]), f"[{f(r['diff_ci_low'])}, {f(r['diff_ci_high'])}]",
                 "" if r["test"] == "deterministic" else f"{f(r['p_value'], '{:.2g}')} / {f(r['p_holm'], '{:.2g}')}",
                 f(r["mde"], "{:.3g}"), f(r["standardised"], "{:+.2f}"), esc(r["verdict"])]
        tds = "".join(f'<td class="num{" sig" if sig and i == 7 else ""}">{c}</td>' if 4 <= i <= 11 else f"<td>{c}</td>"
                      for i, c in enumerate(cells))
        body.append(f"<tr>{tds}</tr>")
    return ('<p class="note">Each effect is a condition\'s metric minus its reference (the baseline, or its matched control) '
            f"on one sample; the difference is {esc(names[0])}'s effect minus the other run's, on the samples both ran (by sample "
            "id): BCa bootstrap interval, paired sign-flip permutation test, p raw / Holm-adjusted across this table, "
            "mde: the smallest difference detectable with power 0.8 at level 0.05; standardised: the mean difference over "
            "the standard deviation of the per-sample differences (the order of the rows, largest first). "
            "<b>Bold</b>: Holm p &lt; 0.05.</p><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
            + "".join(body) + "</table>")

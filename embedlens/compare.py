"""Put finished runs side by side: group fractions, probe summaries, intervention effects and figures.

The headline use is one plan run on a CLIP-tower and a SigLIP-tower model:
``embedlens compare runs/clip runs/siglip`` writes ``compare.csv`` (one row
per summary value, one column per run, and how much they differ) and
``compare.html`` (the same table with the largest differences first and the
figures of each run next to each other).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedlens.errors import InputError
from embedlens.files import contained, write_text
from embedlens.files import claim
from embedlens.report import esc, figure_html, flatten, group_fractions, page, table_html

#: Relative difference above which a row counts as a difference (highlighted, listed first).
DIFF_THRESHOLD = 0.1


@dataclass
class Comparison:
    names: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)  # key, section, values..., abs_diff, rel_diff
    figures: dict[str, list[Path | None]] = field(default_factory=dict)
    csv: Path | None = None
    html: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def differences(self, threshold: float = DIFF_THRESHOLD) -> list[dict[str, Any]]:
        """Rows whose values differ by more than `threshold` (relative), largest first."""
        d = [r for r in self.rows if r["rel_diff"] is not None and r["rel_diff"] > threshold]
        return sorted(d, key=lambda r: -r["rel_diff"])


def _load(run: Path) -> tuple[dict, dict]:
    if not run.is_dir():
        raise InputError(f"run folder not found: {run}")
    m, s = contained(run, "manifest.json"), contained(run, "summary.json")
    if m is None or s is None:
        hint = " (it holds an unfinished run: finish it with embedlens run --resume)" if (run / "checkpoint.safetensors").is_file() else ""
        raise InputError(f"{run} is not a finished embedlens run: manifest.json and summary.json (files, not links) are needed{hint}")
    try:
        manifest, summary = json.loads(m.read_text(encoding="utf-8")), json.loads(s.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{run}: cannot read its manifest or summary ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(summary, dict):
        raise InputError(f"{run}: manifest.json and summary.json must each hold a JSON object")
    return manifest, summary


def readable(v: Any) -> Any:
    """Vocabulary ids made readable: a list of ``{id, token[, count]}`` records becomes ``["token (id) xcount", ...]``."""
    if isinstance(v, dict):
        return {k: readable(x) for k, x in v.items()}
    if isinstance(v, list) and v and all(isinstance(x, dict) and "id" in x and "token" in x for x in v):
        return [f"{x['token']} ({x['id']})" + (f" x{x['count']}" if "count" in x else "") for x in v]
    if isinstance(v, list):
        return [readable(x) for x in v]
    return v


def tokenizer_warning(names: list[str], manifests: list[dict]) -> str | None:
    """A warning when the runs' tokenizers differ: the same vocabulary id then means different words."""
    prints = [m.get("tokenizer", {}).get("sha256") for m in manifests]
    if len(set(prints)) <= 1:
        return None
    shown = ", ".join(f"{n}: {m.get('tokenizer', {}).get('class', '?')} ({m.get('tokenizer', {}).get('vocab_size', '?')} ids)"
                      for n, m in zip(names, manifests))
    return (f"the runs use different tokenizers ({shown}): a vocabulary id means a different word in each, so compare "
            "anchors and nearest tokens by their decoded words, never by id")


def _numeric_lists(vals: list[Any]) -> bool:
    ok = all(isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) for v in vals)
    return ok and len(vals) > 1 and len({len(v) for v in vals}) == 1


def _section(key: str) -> str:
    if key.startswith("groups."):
        return "token groups"
    if key.startswith("effects."):
        return "intervention effects"
    return "probe summaries"


def compare_runs(runs: list[str | Path], out_dir: str | Path, names: list[str] | None = None) -> Comparison:
    """Compare finished runs and write ``compare.csv`` and ``compare.html`` into `out_dir`.

    Args:
        runs: run folders (each with manifest.json and summary.json).
        names: column names (default: each run's model name, else its folder name).

    Raises:
        InputError: a folder is missing or is not a finished run, or fewer than two runs.
    """
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise InputError(f"compare needs at least two run folders; got {len(runs)}")
    loaded = [_load(r) for r in runs]
    if names is None:
        names = []
        for r, (m, _) in zip(runs, loaded):
            n = r.name if m.get("model", {}).get("name") in (None, "model") else m["model"]["name"]
            names.append(n if n not in names else f"{n} ({r})")
    cmp = Comparison(list(names))
    warn = tokenizer_warning(cmp.names, [m for m, _ in loaded])
    if warn:
        cmp.warnings.append(warn)
    values: dict[str, list[Any]] = {}
    for i, (_, s) in enumerate(loaded):
        flat = [(f"groups.{k}", v) for k, v in group_fractions(s).items()]
        part = s.get("partition", {})
        for g in dict.fromkeys(a["group"] for a in part.get("anchors", [])):  # anchors by decoded word
            flat.append((f"groups.anchors.{g}", [f"{a['token']} ({a['id']})" for a in part["anchors"] if a["group"] == g]))
        for k, v in flatten(readable({k: v for k, v in s.items() if k not in ("data", "effects_sem", "controls", "partition")})):
            flat.append((k, v))
        flat.append(("data.used", s.get("data", {}).get("used")))
        for k, v in flat:
            values.setdefault(k, [None] * len(runs))[i] = v
    order = {"token groups": 0, "intervention effects": 1, "probe summaries": 2}
    for key in sorted(values, key=lambda k: (order[_section(k)], k)):
        vals = values[key]
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        abs_d = rel_d = None
        if len(nums) == len(vals) and len(nums) > 1:
            abs_d = max(nums) - min(nums)
            scale = max(abs(x) for x in nums)
            rel_d = abs_d / scale if scale > 0 else 0.0
        elif _numeric_lists(vals):  # per-layer curves: the largest difference at any layer
            cols = list(zip(*vals))
            abs_d = max(max(c) - min(c) for c in cols)
            rel_d = max(((max(c) - min(c)) / max(abs(x) for x in c)) if any(c) else 0.0 for c in cols)
        elif len({json.dumps(v, sort_keys=True, default=str) for v in vals}) > 1:
            rel_d = 1.0  # non-numeric values that differ (or a value only one run has)
        cmp.rows.append({"key": key, "section": _section(key), "values": vals, "abs_diff": abs_d, "rel_diff": rel_d})
    figs: dict[str, list[Path | None]] = {}
    for i, (m, _) in enumerate(loaded):
        for f in m.get("figures", []) if isinstance(m.get("figures"), list) else []:
            if isinstance(f, str):  # only files inside the run folder, reached without links, are read
                figs.setdefault(f, [None] * len(runs))[i] = contained(runs[i], f)
    cmp.figures = figs
    out = claim(out_dir, kind="compare")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "key", *cmp.names, "abs_diff", "rel_diff"])
    for r in cmp.rows:
        w.writerow([r["section"], r["key"], *[json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v) for v in r["values"]], r["abs_diff"] if r["abs_diff"] is not None else "", r["rel_diff"] if r["rel_diff"] is not None else ""])
    cmp.csv = out / "compare.csv"
    write_text(cmp.csv, buf.getvalue())
    cmp.html = out / "compare.html"
    write_text(cmp.html, _html(cmp, runs, loaded))
    return cmp


def _html(cmp: Comparison, runs: list[Path], loaded: list[tuple[dict, dict]]) -> str:
    head = ["key", *cmp.names, "abs diff", "rel diff"]
    parts = []
    about = [[n, str(r), m.get("model", {}).get("source"), m.get("plan_hash"), m.get("n_samples")] for n, r, (m, _) in zip(cmp.names, runs, loaded)]
    parts.append("<h2>Runs</h2>" + table_html(["name", "folder", "model", "plan hash", "samples"], about))
    for w in cmp.warnings:
        parts.append(f'<p class="bad">Warning: {esc(w)}</p>')
    hashes = {m.get("plan_hash") for m, _ in loaded}
    if len(hashes) > 1:
        parts.append('<p class="bad">The runs come from different plans (plan hashes differ): differences may come from the plans, not only the models.</p>')
    diffs = cmp.differences()
    parts.append(
        f"<h2>Where they differ</h2><p class='note'>{len(diffs)} values differ by more than {DIFF_THRESHOLD:.0%} (relative), largest first.</p>"
        + table_html(head, [[r["key"], *r["values"], r["abs_diff"], r["rel_diff"]] for r in diffs[:40]])
    )
    for section in ("token groups", "intervention effects", "probe summaries"):
        rows = [r for r in cmp.rows if r["section"] == section]
        if not rows:
            continue
        parts.append(
            f"<h2>{esc(section.capitalize())}</h2>"
            + table_html(
                head,
                [[r["key"], *r["values"], r["abs_diff"], r["rel_diff"]] for r in rows],
                [r["rel_diff"] is not None and r["rel_diff"] > DIFF_THRESHOLD for r in rows],
            )
        )
    if cmp.figures:
        figs = []
        for rel, paths in cmp.figures.items():
            cells = "".join(figure_html(p, f"{n}: {rel}") if p is not None else f'<figure><p class="note">{esc(n)}: no such figure</p></figure>' for n, p in zip(cmp.names, paths))
            figs.append(f"<h3>{esc(rel)}</h3><div class='figs'>{cells}</div>")
        parts.append("<h2>Figures side by side</h2>" + "".join(figs))
    return page("embedlens comparison: " + " vs ".join(cmp.names), " · ".join(str(r) for r in runs), "".join(parts))

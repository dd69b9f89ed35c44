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
import math
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
    curves: list[Path] = field(default_factory=list)  # per-layer values of every run on shared axes
    maps: list[Path] = field(default_factory=list)  # token maps of every run on one colour scale (`embedlens.compare_maps`)
    csv: Path | None = None
    html: Path | None = None
    warnings: list[str] = field(default_factory=list)
    #: Paired tests of each effect between the models over shared samples (`embedlens.compare_effects`).
    model_tests: list[dict[str, Any]] = field(default_factory=list)

    def differences(self, threshold: float = DIFF_THRESHOLD) -> list[dict[str, Any]]:
        """Rows whose values differ by more than `threshold` (relative) and by more than rounding, ordered by the
        standardised difference (the difference over its standard error) where the runs give one, then by the
        relative difference; values near zero in every run (below `NEGLIGIBLE`) are left out."""
        d = [r for r in self.rows if r["rel_diff"] is not None and r["rel_diff"] > threshold and r["abs_diff"] != 0
             and not _negligible(r["values"])]
        return sorted(d, key=lambda r: (r.get("z") is None, -(r.get("z") or 0.0), -r["rel_diff"]))


def _load(run: Path) -> tuple[dict, dict]:
    if not run.is_dir():
        raise InputError(f"run folder not found: {run}")
    m, s = contained(run, "manifest.json"), contained(run, "summary.json")
    if m is None or s is None:
        hint = " (it holds an unfinished run: finish it with embedlens run --resume)" if (run / "checkpoint.safetensors").is_file() else ""
        raise InputError(f"{run} is not a finished embedlens run: manifest.json and summary.json (files, not links) are needed{hint}")
    return _checked(run, m, s)


def _checked(run: Path, m: Path, s: Path) -> tuple[dict, dict]:
    """Input validation at load time (`embedlens.run_record`): a run folder may come from anyone."""
    from embedlens.files import utf8_path
    from embedlens.run_record import check_manifest, check_summary, read_record

    utf8_path(run, "run folder", InputError)  # its name is written into compare.csv and compare.html
    manifest, summary = read_record(m, "manifest"), read_record(s, "summary")
    check_summary(s, summary)
    return check_manifest(m, manifest), summary


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
    if key.startswith(("effects.", "statistics.")):
        return "intervention effects"
    return "probe summaries"


def _item_lists(vals: list[Any]) -> bool:
    """Lists of words or ids in every run (anchors, top tokens): compared as sets."""
    return len(vals) > 1 and all(isinstance(v, list) for v in vals) and any(v for v in vals) and all(
        isinstance(x, (str, int)) and not isinstance(x, bool) for v in vals for x in v
    ) and not _numeric_lists(vals)


def _overlap(vals: list[list], names: list[str]) -> tuple[float, str]:
    """``(1 - Jaccard overlap, "shared: ...; only A: ...")`` of lists taken as sets.

    Example:
        >>> _overlap([["sky", "red", "dog"], ["red", "sky", "cat"]], ["clip", "siglip"])
        (0.5, 'shared (2): red, sky; only clip (1): dog; only siglip (1): cat')
    """
    sets = [set(map(str, v)) for v in vals]
    union, common = set().union(*sets), set.intersection(*sets)
    parts = [f"shared ({len(common)}): {', '.join(sorted(common)) or '-'}"]
    for n, st in zip(names, sets):
        others = set().union(*[o for o in sets if o is not st])
        only = st - others
        if only:
            parts.append(f"only {n} ({len(only)}): {', '.join(sorted(only))}")
    return (1.0 - len(common) / len(union) if union else 0.0), "; ".join(parts)


#: Numbers at most this large in every run are taken as zero when ordering differences (a log-prob of -0.0002 vs 0.007).
NEGLIGIBLE = 0.01


def _negligible(vals: list[Any]) -> bool:
    nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return len(nums) == len(vals) and all(abs(v) <= NEGLIGIBLE for v in nums)


def _standardised(key: str, vals: list[Any], summaries: list[dict]) -> float | None:
    """|a - b| over the root sum of squared standard errors, for an effect mean whose runs give standard errors."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "effects" or len(vals) != 2:
        return None
    sems = [s.get("effects_sem", {}).get(parts[1], {}).get(parts[2]) for s in summaries]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [*vals, *sems]):
        return None
    se = math.sqrt(sems[0] ** 2 + sems[1] ** 2)
    return abs(vals[0] - vals[1]) / se if se > 0 else None


#: At most this many per-layer curve figures in a comparison (the largest differences first).
MAX_CURVES = 24


def _curves(cmp: Comparison, out: Path) -> list[Path]:
    """Per-layer values (equal-length numeric lists of 3 or more, or ``..._lN`` columns) as one figure each,
    every run a curve on shared axes."""
    import re

    from embedlens.figures import layer_curves, safe_name

    series: dict[str, list[list[float]]] = {}
    for r in cmp.rows:
        if _numeric_lists(r["values"]) and len(r["values"][0]) >= 3:
            series[r["key"]] = [list(v) for v in r["values"]]
    per_layer: dict[str, dict[int, list]] = {}
    for r in cmp.rows:
        m = re.match(r"^(.*)_l(\d+)$", r["key"])
        if m and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r["values"]):
            per_layer.setdefault(m.group(1), {})[int(m.group(2))] = r["values"]
    for key, layers in per_layer.items():
        if len(layers) >= 2:
            order = sorted(layers)
            series[key + "_l*"] = [[layers[i][j] for i in order] for j in range(len(cmp.names))]

    def spread(vals: list[list[float]]) -> float:
        return max(max(c) - min(c) for c in zip(*vals))

    paths = []
    differing = [k for k in series if spread(series[k]) > 0]  # identical curves say nothing a table does not
    values = {r["key"]: r["values"] for r in cmp.rows}
    for key in sorted(differing, key=lambda k: -spread(series[k]))[:MAX_CURVES]:
        vals = series[key]
        if key.endswith("_l*"):
            xs_all = [sorted(per_layer[key[:-3]])] * len(vals)
            xlabel = "LLM layer"
        else:
            xs_all, xlabel = _layer_numbers(key, values, vals)
        curves = {n: (xs, v) for n, xs, v in zip(cmp.names, xs_all, vals)}
        paths.append(layer_curves(curves, out / "curves" / f"{safe_name(key)}.png", xlabel=xlabel, ylabel=_quantity(key), title=key,
                                  legend_title="run"))
    return paths


#: Parts of a summary key that name a token group rather than a quantity.
_GROUP_WORDS = {"sink", "dead", "alive", "visual", "last", "text", "all", "image", "prompt", "question"}
#: Parts of a summary key that say how values are laid out, not what they are.
_LAYOUT_WORDS = {"by_role", "per_layer", "per_layer_head", "values", "groups"}


def _quantity(key: str) -> str:
    """An axis label naming the quantity and the group(s): ``logit_lens.by_role.alive.mean_entropy`` -> ``mean_entropy
    (alive tokens)``; ``attention_flow.attention_mass.last.dead.per_layer`` -> ``attention_mass (last / dead tokens)``.

    Example:
        >>> _quantity("layer_alignment.cka.dead"), _quantity("effects.prune.visual_tokens_l*")
        ('cka (dead tokens)', 'visual_tokens')
    """
    parts = key.removesuffix("_l*").split(".")[1:] or [key]
    groups = [p for p in parts if p in _GROUP_WORDS]
    quantity = next((p for p in reversed(parts) if p not in _GROUP_WORDS and p not in _LAYOUT_WORDS), parts[-1])
    return f"{quantity} ({' / '.join(groups)} tokens)" if groups else quantity


def _layer_numbers(key: str, values: dict[str, list], vals: list[list]) -> tuple[list[list], str]:
    """Each run's x values for a per-layer list: the model's layer numbers from the nearest ``layers`` list beside
    it in the summary (``a.b.layers`` for ``a.b.c.d``), else positions in the list."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        layers = values.get(".".join(parts[:cut] + ["layers"]))
        if layers and all(isinstance(lv, list) and len(lv) == len(v) and all(isinstance(x, int) for x in lv)
                          for lv, v in zip(layers, vals)):
            return [list(lv) for lv in layers], "LLM layer"
    return [list(range(len(v))) for v in vals], "position in the per-layer list (no layer numbers in the summary)"


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
        detail = ""
        if _item_lists(vals):  # lists of words / ids: compared as sets (overlap), not as strings
            rel_d, detail = _overlap(vals, cmp.names)
        elif abs_d is None and len({json.dumps(v, sort_keys=True, default=str) for v in vals}) > 1:
            rel_d = 1.0  # non-numeric values that differ (or a value only one run has)
        cmp.rows.append({"key": key, "section": _section(key), "values": vals, "abs_diff": abs_d, "rel_diff": rel_d, "detail": detail,
                         "z": _standardised(key, vals, [sm for _, sm in loaded])})
    figs: dict[str, list[Path | None]] = {}
    for i, (m, _) in enumerate(loaded):
        for f in m.get("figures", []) if isinstance(m.get("figures"), list) else []:
            if isinstance(f, str):  # only files inside the run folder, reached without links, are read
                figs.setdefault(f, [None] * len(runs))[i] = contained(runs[i], f)
    cmp.figures = figs
    from embedlens.compare_effects import COLUMNS as TEST_COLUMNS, model_differences

    cmp.model_tests = model_differences(cmp.names, runs, loaded)
    out = claim(out_dir, kind="compare")
    cmp.curves = _curves(cmp, out)
    from embedlens.compare_maps import joint_maps

    cmp.maps = joint_maps(cmp.names, runs, [m for m, _ in loaded], out, cmp.warnings)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "key", *cmp.names, "abs_diff", "rel_diff", "detail"])
    for r in cmp.rows:
        w.writerow([r["section"], r["key"], *[json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v) for v in r["values"]], r["abs_diff"] if r["abs_diff"] is not None else "", r["rel_diff"] if r["rel_diff"] is not None else "", r["detail"]])
    cmp.csv = out / "compare.csv"
    write_text(cmp.csv, buf.getvalue())
    if cmp.model_tests:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["other", *TEST_COLUMNS])
        for r in cmp.model_tests:
            w.writerow([r["other"], *[r[c] for c in TEST_COLUMNS]])
        write_text(out / "compare_effects.csv", buf.getvalue())
    cmp.html = out / "compare.html"
    write_text(cmp.html, _html(cmp, runs, loaded))
    return cmp


def _effects_html(names: list[str], loaded: list[tuple[dict, dict]]) -> str:
    """Each condition's metric means in every run, side by side, one row per condition and metric (baseline
    columns ``X_base`` shown as the baseline's row)."""
    effects = [s.get("effects", {}) if isinstance(s.get("effects"), dict) else {} for _, s in loaded]
    conds = list(dict.fromkeys(c for e in effects for c in e))
    if not conds:
        return '<p class="note">No intervention effects in these runs.</p>'
    import re

    metrics = list(dict.fromkeys(m for e in effects for c in e.values() for m in c if not re.search(r"_l\d+$", m) and not m.endswith("_base")))
    rows = []
    for m in metrics:
        base = [next((e[c].get(f"{m}_base") for c in e if f"{m}_base" in e[c]), None) for e in effects]
        if any(v is not None for v in base):
            rows.append(["baseline", m, *base])
        for c in conds:
            vals = [e.get(c, {}).get(m) for e in effects]
            if any(v is not None for v in vals):
                rows.append([c, m, *vals])
    for r in rows:
        nums = [v for v in r[2:] if isinstance(v, (int, float)) and not isinstance(v, bool)]
        r.append(nums[0] - nums[1] if len(nums) == 2 == len(r[2:]) else "")
    return ('<p class="note">Means over samples. Whether an effect differs between the models is tested above, on the '
            "samples both ran.</p>" + table_html(["condition", "metric", *names, f"{names[0]} - {names[1]}" if len(names) == 2 else "diff"], rows))


def _html(cmp: Comparison, runs: list[Path], loaded: list[tuple[dict, dict]]) -> str:
    head = ["key", *cmp.names, "abs diff", "rel diff", "overlap"]
    parts = []
    about = [[n, str(r), m.get("model", {}).get("source"), m.get("plan_hash"), m.get("n_samples")] for n, r, (m, _) in zip(cmp.names, runs, loaded)]
    parts.append("<h2>Runs</h2>" + table_html(["name", "folder", "model", "plan hash", "samples"], about))
    for w in cmp.warnings:
        parts.append(f'<p class="bad">Warning: {esc(w)}</p>')
    hashes = {m.get("plan_hash") for m, _ in loaded}
    if len(hashes) > 1:
        parts.append('<p class="bad">The runs come from different plans (plan hashes differ): differences may come from the plans, not only the models.</p>')
    from embedlens.compare_effects import model_differences_html

    parts.append("<h2>Do the models differ? Paired tests of each effect</h2>" + model_differences_html(cmp.model_tests, cmp.names))
    diffs = cmp.differences()
    parts.append(
        f"<h2>Where the summaries differ</h2><p class='note'>{len(diffs)} values differ by more than {DIFF_THRESHOLD:.0%} "
        f"(relative) and are not near zero (|value| &gt; {NEGLIGIBLE}) in every run; ordered by the standardised difference "
        "(|a - b| over the root sum of the squared standard errors) where the runs give standard errors (effect means), "
        "then by the relative difference.</p>"
        + table_html([*head[:-1], "standardised", "overlap"],
                     [[r["key"], *r["values"], r["abs_diff"], r["rel_diff"], "" if r.get("z") is None else r["z"], r["detail"]]
                      for r in diffs[:40]])
    )
    parts.append("<h2>Intervention effects</h2>" + _effects_html(cmp.names, loaded))
    for section in ("token groups", "probe summaries"):
        rows = [r for r in cmp.rows if r["section"] == section]
        if not rows:
            continue
        parts.append(
            f"<h2>{esc(section.capitalize())}</h2>"
            + table_html(
                head,
                [[r["key"], *r["values"], r["abs_diff"], r["rel_diff"], r["detail"]] for r in rows],
                [r["rel_diff"] is not None and r["rel_diff"] > DIFF_THRESHOLD for r in rows],
            )
        )
    if cmp.curves:
        parts.append("<h2>Per-layer values: every run on shared axes</h2><p class='note'>Largest differences first; x: the "
                     "model's LLM layer numbers.</p><div class='sidebyside'>" + "".join(figure_html(p, p.stem) for p in cmp.curves) + "</div>")
    if cmp.maps:
        parts.append("<h2>Token maps on one colour scale</h2><p class='note'>Drawn again from each run's per-token tables: a "
                     "row per run, a column per sample both ran; every panel of a figure shares one scale (heat maps: one "
                     "minimum and maximum over all panels; groups and words: one colour per category, words by their "
                     "frequency over every run). The patch grid only: the images are in each run's report.</p>"
                     + "".join(figure_html(p, p.stem) for p in cmp.maps))
    if cmp.figures:
        figs = []
        for rel, paths in cmp.figures.items():
            cells = "".join(figure_html(p, f"{n}: {rel}") if p is not None else f'<figure><p class="note">{esc(n)}: no such figure</p></figure>' for n, p in zip(cmp.names, paths))
            figs.append(f"<h3>{esc(rel)}</h3><div class='sidebyside'>{cells}</div>")
        parts.append("<h2>Figures side by side</h2><p class='note'>Each run's own figures, click one for full resolution. Group "
                     "maps share fixed colours (sink red, dead grey, alive green), normalised entropies a fixed 0-1 scale and accuracy "
                     "charts a fixed 0-1 axis; a run's own word map colours its own most frequent words (the maps above put "
                     "the runs on one scale).</p>" + "".join(figs))
    return page("embedlens comparison: " + " vs ".join(cmp.names), " · ".join(str(r) for r in runs), "".join(parts))

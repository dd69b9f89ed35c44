"""One self-contained HTML page per run (figures inlined), and helpers shared with `compare`.

The page needs no server and no network: images are embedded as data URIs,
styles are inline, there is no script. Every figure is shown at the page's
full width and opens at full resolution on click (a CSS-only overlay; click
again to close), so a 2500-pixel token map stays readable.
"""

from __future__ import annotations

import base64
import re
import html
import json
from pathlib import Path
from typing import Any, Iterable

from embedlens.files import contained

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#20232a;color:#fff;padding:14px 24px}
header h1{font-size:20px;margin:0 0 4px}
header p{margin:0;color:#c9d1d9;font-size:13px}
main{padding:8px 24px 40px;max-width:1400px}
h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:12.5px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top;max-width:520px}
th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.diff td{background:#fff4d6}
.figs{display:flex;flex-direction:column;gap:14px}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px;max-width:100%}
figure.wide{max-width:100%}
label.zoom{cursor:zoom-in;display:block}
label.zoom input{display:none}
label.zoom input:checked+span{position:fixed;inset:0;z-index:10;overflow:auto;background:rgba(255,255,255,.98);cursor:zoom-out;padding:8px}
label.zoom input:checked+span img{max-width:none;width:auto}
.sidebyside{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:12px}
td.num{white-space:nowrap}
pre.plan{background:#fff;border:1px solid #ddd;padding:8px 12px;font-size:12px;overflow-x:auto;white-space:pre-wrap}
td.sig{font-weight:600}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:12px;color:#555;margin-top:4px;word-break:break-all}
.note{color:#666;font-size:12.5px}
.probe{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.bad{color:#b00020}
.warn{background:#fff4d6;border:1px solid #e0b44c;padding:6px 12px;margin:10px 0}
.warn li{margin:3px 0}
nav a{margin-right:12px;color:#0b57d0;text-decoration:none}
"""

GROUP_KEYS = ("token_partition", "anchor_groups")


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any) -> str:
    """A value as short text: floats to 4 significant digits, short lists inline."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def flatten(d: Any, prefix: str = "", max_list: int = 12) -> list[tuple[str, Any]]:
    """Scalar leaves of a nested summary as (dotted key, value); short lists of scalars kept whole."""
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k), max_list)
    elif isinstance(d, list):
        if len(d) <= max_list and all(isinstance(x, (int, float, str, bool)) or x is None for x in d):
            out.append((prefix, d))
    else:
        out.append((prefix, d))
    return out


def image_uri(path: Path) -> str:
    """A PNG/SVG file as a data URI."""
    data = path.read_bytes()
    kind = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def figure_html(path: Path | None, caption: str, wide: bool = False) -> str:
    """A figure inlined as a data URI; `path` must already be checked to lie inside its run (`contained`)."""
    cls = ' class="wide"' if wide else ""
    if path is None or not path.is_file():
        return f'<figure{cls}><p class="note">missing: {esc(caption)}</p></figure>'
    return (f'<figure{cls}><label class="zoom" title="click: full resolution; click again: back"><input type="checkbox">'
            f'<span><img alt="{esc(caption)}" src="{image_uri(path)}"></span></label><figcaption>{esc(caption)} '
            '<span class="note">(click the figure for full resolution)</span></figcaption></figure>')


def table_html(header: list[str], rows: Iterable[list[Any]], highlight: Iterable[bool] | None = None) -> str:
    hl = list(highlight) if highlight is not None else None
    body = []
    for i, row in enumerate(rows):
        cls = ' class="diff"' if hl and hl[i] else ""
        cells = "".join(
            f'<td class="num">{esc(fmt(v))}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool) else f"<td>{esc(fmt(v))}</td>"
            for v in row
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" + "".join(body) + "</table>"


def page(title: str, subtitle: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{_CSS}</style></head><body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
        f"<main>{body}</main></body></html>\n"
    )


def group_fractions(summary: dict) -> dict[str, float]:
    """Token group fractions (sink / dead / alive ...) of a run's summary: the run's partition, else the partition probes."""
    part = summary.get("partition")
    if isinstance(part, dict) and isinstance(part.get("fractions"), dict) and part.get("n_visual_tokens"):
        return dict(part["fractions"])
    for key in GROUP_KEYS:
        for label, res in summary.items():
            if (label == key or label.startswith(key + "[")) and isinstance(res, dict) and isinstance(res.get("fractions"), dict):
                return dict(res["fractions"])
    return {}


def partition_html(part: dict) -> str:
    """The run's partition: groups with per-image spread, the anchors decoded, and the discovery evidence."""
    per = part.get("per_image_fraction", {})
    out = table_html(
        ["group", "tokens", "fraction", "per image: mean", "min", "max"],
        [[g, part["counts"].get(g, 0), part["fractions"].get(g, 0.0), per.get(g, {}).get("mean"), per.get(g, {}).get("min"), per.get(g, {}).get("max")]
         for g in part["order"]],
    )
    out += f'<p class="note">{part.get("n_visual_tokens", 0)} visual tokens of {part.get("n_images", 0)} images; precedence: {esc(" > ".join(part["order"]))}.</p>'
    anchors = part.get("anchors", [])
    out += "<h3>Anchors</h3>" + (table_html(["group", "id", "token", "source"], [[a["group"], a["id"], a["token"], a["source"]] for a in anchors])
                                 if anchors else '<p class="note">none</p>')
    ev = part.get("discovery")
    if ev:
        cols = ["verdict", "token (id)", "tokens", "token share", "images", "cos between images", "relative dispersion",
                "outlier share", "norm ratio", "reason"]
        rows = [[r["verdict"], f"{r['token']} ({r['id']})", r["tokens"], r["token_share"], r["images"], r["cos_between"],
                 r["relative_dispersion"], r["outlier_fraction"], r["norm_ratio"], r["reason"]] for r in ev]
        out += ("<h3>Anchor discovery: every candidate and its verdict</h3>"
                '<p class="note">An id is a dead anchor when the tokens that land on it collapse (their dispersion across images, '
                "1 - cos between images, is at most max_dispersion x that of all other tokens: the relative dispersion), a sink anchor "
                "when its tokens are mostly ViT-norm / massive-activation outliers; either must be the nearest id of some token in "
                "min_image_fraction of the images. Frequency alone decides nothing. All columns: <code>partition_discovery</code>.</p>"
                + table_html(cols, rows, highlight=[r["verdict"] in ("sink", "dead") for r in ev]))
    return out


def layer_summary_html(lens: dict) -> str:
    """The embedding lens layer by layer: per token group and layer, the most frequent nearest words, the share
    that name something in the image (ground truth), and the share that agree with the last layer read."""
    final = lens.get("final_layer")
    rows = []
    for g, layers in lens["groups"].items():
        for layer, e in sorted(layers.items(), key=lambda kv: int(kv[0])):
            words = ", ".join(f"{t['token']} ({t['count']})" for t in e.get("top1", []))
            cs, ag = e.get("content_word_share"), e.get("agrees_with_final_layer")
            rows.append([g, int(layer), e.get("n_tokens"), words, "" if cs is None else f"{cs:.0%}", "" if ag is None else f"{ag:.0%}"])
    return ("<h3>Layer by layer: the visual tokens' nearest words</h3>"
            '<p class="note">Per token group and LLM layer (0: the LLM input): the most frequent nearest (top-1) vocabulary '
            "words with their token counts; the share of tokens whose top-1 names a content of their image (a colour, shape "
            f"or written word of the data's ground truth; empty without ground truth); the share whose top-1 is the same as "
            f"at layer {esc(final)}, the last layer read.</p>"
            + table_html(["group", "layer", "tokens", "most frequent top-1 words (tokens)", "content word of the image",
                          f"same top-1 as layer {final}"], rows))


def _preview(path: Path, n: int = 8) -> tuple[list[str], list[list[Any]], int]:
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        t = pq.read_table(path)
        head = t.slice(0, n).to_pylist()
        cols = t.column_names
        return cols, [[r[c] for c in cols] for r in head], t.num_rows
    import csv

    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1 : n + 1], len(rows) - 1


def write_report(run_dir: str | Path, manifest: dict | None = None, extra_sections: Iterable[tuple[str, str, str]] = ()) -> Path:
    """Write ``report.html`` for a run folder (summary.json, and manifest.json unless `manifest` is given); returns its path.

    Only files inside the run folder are read (figures and tables a manifest
    names elsewhere, or through links, show as missing). `extra_sections` are
    ``(id, heading, html)`` sections added after the data section (e.g. ``embedlens eval``'s
    benchmarks); a summary key equal to a section's id is left to that section.
    """
    from embedlens.files import write_text

    run = Path(run_dir)
    if manifest is None:
        manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    model = manifest.get("model", {})
    title = f"embedlens run: {model.get('name', '')} ({model.get('source', '')})"
    v = manifest.get("versions", {})
    subtitle = (
        f"plan {manifest.get('plan')} · hash {manifest.get('plan_hash')} · seed {manifest.get('seed')} · "
        f"{manifest.get('n_samples')} samples · device {manifest.get('device')} · "
        + " · ".join(f"{k} {v[k]}" for k in ("embedlens", "torch", "transformers", "nnsight") if k in v)
    )
    figures = [Path(f) for f in manifest.get("figures", [])]
    used: set[Path] = set()
    parts: list[str] = []
    sections = ["data"]
    data = summary.get("data", {})
    body = [f"<p>{data.get('used', '?')} of {data.get('samples', '?')} samples used; {data.get('converted', 0)} image(s) converted.</p>"]
    if data.get("skipped"):
        body.append('<p class="bad">Skipped samples (their images could not be read):</p>')
        body.append(table_html(["sample", "where", "error"], [[s["sample_id"], s["where"], s["error"]] for s in data["skipped"]]))
    parts.append('<h2 id="data">Data</h2>' + "".join(body))
    extra = list(extra_sections)
    for sid, heading, html_ in extra:
        sections.append(sid)
        parts.append(f'<h2 id="{esc(sid)}">{esc(heading)}</h2>' + html_)
    warnings = summary.get("partition", {}).get("warnings", [])
    if warnings:
        sections.insert(0, "warnings")
        parts.insert(0, '<h2 id="warnings">Warnings</h2><div class="warn"><ul>' + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul></div>")
    part = summary.get("partition")
    fr = group_fractions(summary)
    if isinstance(part, dict) and part.get("order"):
        sections.append("partition")
        figs = [f for f in figures if f.name == "partition_discovery.png"]
        used |= set(figs)
        parts.append('<h2 id="partition">Partition (sink / dead / alive)</h2>' + partition_html(part)
                     + '<div class="figs">' + "".join(figure_html(run / f, f.name) for f in figs) + "</div>")
    elif fr:
        sections.append("groups")
        parts.append('<h2 id="groups">Token groups</h2>' + table_html(["group", "fraction of visual tokens"], [[k, v] for k, v in fr.items()]))
    stats = summary.get("statistics")
    if stats:
        sections.append("statistics")
        html_, figs = statistics_html(run, manifest, stats, figures)
        used |= set(figs)
        parts.append('<h2 id="statistics">What the effects support: paired comparisons</h2>' + html_)
    board = summary.get("leaderboard")
    if board:
        sections.append("leaderboard")
        figs = [f for f in figures if f.name == "leaderboard_accuracy.png"]
        used |= set(figs)
        parts.append('<h2 id="leaderboard">Token reduction: methods at matched budgets</h2>' + leaderboard_html(board)
                     + '<div class="figs">' + "".join(figure_html(contained(run, f), f.name) for f in figs) + "</div>")
    effects = summary.get("effects")
    if effects:
        sections.append("effects")
        sem = summary.get("effects_sem", {})
        controls = summary.get("controls", {})
        metrics = sorted({m for cols in effects.values() for m in cols if not re.search(r"_l\d+$", m)})  # per-layer columns: in the table files
        rows = [[c] + [effects[c].get(m) for m in metrics] + [controls.get(c, "")] for c in effects]
        html_ = table_html(["condition"] + metrics + ["matched control"], rows)
        html_ += '<p class="note">Means over samples; standard errors in <code>effects_summary</code>.</p>' if sem else ""
        figs = [f for f in figures if f.name.startswith("effects_") and f not in used]
        used |= set(figs)
        html_ += '<div class="figs">' + "".join(figure_html(contained(run, f), f.name) for f in figs) + "</div>"
        parts.append('<h2 id="effects">Intervention effects</h2>' + html_)
    probe_labels = [k for k in summary if k not in ("data", "effects", "effects_sem", "controls", "partition", "statistics", "leaderboard",
                                                    *(e[0] for e in extra))]
    for label in probe_labels:
        sections.append(f"probe-{label}")
        res = summary[label]
        lens = res.get("layer_summary") if isinstance(res, dict) else None
        flat = flatten({k: v for k, v in res.items() if k != "layer_summary"} if isinstance(res, dict) else res)
        html_ = layer_summary_html(lens) if isinstance(lens, dict) and lens.get("groups") else ""
        html_ += table_html(["key", "value"], [[k, val] for k, val in flat[:60]])
        if len(flat) > 60:
            html_ += f'<p class="note">{len(flat) - 60} more values in summary.json</p>'
        base = label.split("[")[0]
        figs = [f for f in figures if f not in used and (f.parent.name == label or (f.parent.name == "figures" and f.name.startswith(base)))]
        used |= set(figs)
        if figs:
            html_ += '<div class="figs">' + "".join(figure_html(contained(run, f), f.name) for f in figs) + "</div>"
        parts.append(f'<h2 id="probe-{esc(label)}">{esc(label)}</h2><div class="probe">' + html_ + "</div>")
    rest = [f for f in figures if f not in used]
    if rest:
        sections.append("figures")
        parts.append('<h2 id="figures">Other figures</h2><div class="figs">' + "".join(figure_html(contained(run, f), str(f)) for f in rest) + "</div>")
    tables = manifest.get("tables", {})
    if tables:
        sections.append("tables")
        html_ = []
        for name, rel in tables.items():
            path = contained(run, rel)
            if path is None:
                html_.append(f"<h3>{esc(name)}</h3><p class='note'>missing or outside the run folder: {esc(rel)}</p>")
                continue
            cols, rows, n = _preview(path)
            html_.append(f"<h3>{esc(name)} <span class='note'>({n} rows, {esc(rel)})</span></h3>" + table_html(cols, rows))
        parts.append('<h2 id="tables">Tables (first rows)</h2>' + "".join(html_))
    plan_file = contained(run, "run_plan.yaml")
    if plan_file is not None:
        sections.append("plan")
        parts.append('<h2 id="plan">The plan</h2><p class="note">As written (run_plan.yaml in the run folder; hash '
                     f'{esc(manifest.get("plan_hash"))}).</p><pre class="plan">{esc(plan_file.read_text(encoding="utf-8"))}</pre>')
    nav = "<nav>" + "".join(f'<a href="#{esc(s)}">{esc(s.removeprefix("probe-"))}</a>' for s in sections) + "</nav>"
    out = run / "report.html"
    write_text(out, page(title, subtitle, nav + "".join(parts)))
    return out


def leaderboard_html(board: list[dict[str, Any]]) -> str:
    """The token-reduction leaderboard (`embedlens.plan.leaderboard`): method x budget."""
    header = ["method", "keep", "tokens", "accuracy", "retention %", "p vs baseline", "random", "p vs random", "log-prob diff",
              "tokens per layer", "paper's count", "prefill ms", "speed-up", "select ms", "GFLOPs", "peak MB"]
    rows = [[r["method"], r["keep"], r["tokens"], r["accuracy"], r["retention"], _p(r["p_baseline"]), r["accuracy_random"],
             _p(r["p_random"]), r["logprob_diff"], r["equivalent_tokens"], r.get("paper_tokens"), r["prefill_ms"], r["prefill_speedup"],
             r["select_ms"], r["gflops"], r["peak_mem_mb"]] for r in board]
    rows = [["" if v is None else v for v in row] for row in rows]  # NaN (JSON null): not measured here (peak memory on a CPU)
    base = board[0]
    note = (f'<p class="note">Baseline (every token): accuracy {fmt(base.get("accuracy_base"))}, prefill {fmt(base.get("prefill_ms_base"))} ms '
            f'per sample, {fmt(base.get("gflops_base"))} GFLOPs. p-values are paired (McNemar for accuracy), unadjusted; "random" is the '
            "random draw at the same budget. Prefill: CUDA events on a GPU, process CPU time otherwise; tokens per layer: "
            "the visual tokens the LLM's layers held, averaged over layers (measured); paper's count: the number the method's "
            "paper reports for this schedule. All columns: the <code>leaderboard</code> table.</p>")
    rules = {r["method"]: r.get("accounting") for r in board if r.get("accounting")}
    if rules:
        note += "<p class=\"note\">Accounting: " + "; ".join(f"<b>{esc(m)}</b>: {esc(a)}" for m, a in rules.items()) + "</p>"
    return table_html(header, rows) + note


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A run's table (Parquet, or CSV with numbers parsed back) as a list of row dicts."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    import csv

    def num(v: str) -> Any:
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with path.open(newline="", encoding="utf-8") as fh:
        return [{k: num(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def _ci(lo: Any, hi: Any, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"[{f.format(lo)}, {f.format(hi)}]" if isinstance(lo, (int, float)) and lo == lo else ""


def _p(p: Any) -> str:
    return "" if not isinstance(p, (int, float)) or p != p else (f"{p:.2g}" if p >= 0.001 else "<0.001")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _diff_cell(r: dict | None) -> str:
    """Four cells of a paired comparison: the difference, its interval, raw and Holm p (discordant pairs), and the MDE."""
    if r is None:
        return "<td></td>" * 4
    if r.get("test") == "deterministic":
        return f'<td class="num">{r["diff"]:+.3f}</td><td colspan=3 class="note">deterministic: the same on every sample, no test</td>'
    ph = r.get("p_holm")
    sig = _num(ph) and ph < 0.05
    cls = ' class="num sig"' if sig else ' class="num"'
    disc = f" ({r['x_only']} vs {r['reference_only']})" if isinstance(r.get("x_only"), int) and r["x_only"] >= 0 else ""
    holm = f" / {_p(ph)}" if _num(ph) else ""
    mde = f"{r['mde']:.3f}" if _num(r.get("mde")) else ""
    return (f"<td{cls}>{r['diff']:+.3f}</td><td class=\"num\">{esc(_ci(r['diff_ci_low'], r['diff_ci_high'], True))}</td>"
            f"<td class=\"num\">{esc(_p(r['p_value']))}{esc(holm)}{esc(disc)}</td><td class=\"num\">{esc(mde)}</td>")


def _overlap_cell(r: dict | None) -> str:
    v = r.get("overlap") if r else None
    return f'<td class="num">{v:.0%}</td>' if _num(v) else "<td></td>"


def _sentences(items: list[tuple[str, dict | None]]) -> str:
    """What each comparison supports, one sentence each (the ``verdict`` column of ``effect_tests``)."""
    lis = [f"<li><b>{esc(label)}</b>: {esc(r['verdict'])}</li>" for label, r in items if r is not None and r.get("verdict")]
    return f'<ul class="verdicts">{"".join(lis)}</ul>' if lis else ""


def statistics_html(run: Path, manifest: dict, stats: dict, figures: list[Path]) -> tuple[str, list[Path]]:
    """The paired comparisons of a run (`embedlens.plan.conclusions`): method, warnings, accuracy tables with intervals,
    tests and minimum detectable effects, one sentence per comparison, per-group accuracies, the other metrics, and
    their figures. Returns the HTML and the figures it shows."""
    rel = manifest.get("tables", {}).get("effect_tests")
    path = contained(run, rel) if rel else None
    if path is None:
        return '<p class="note">effect_tests table missing</p>', []
    rows = read_rows(path)
    index = {(r["condition"], r["reference"] or "", r["metric"], r["by"], str(r["group"])): r for r in rows}
    m = stats.get("method", {})
    conf = int(round(100 * m.get("confidence", 0.95)))
    out = [f'<p class="note">Every comparison is paired: a condition and its reference ran on the same samples. '
           f"Intervals of a difference: {conf}% {esc(m.get('interval', ''))}, {esc(m.get('resamples'))} resamples, seeded from "
           f"the run seed {esc(m.get('seed'))}; of a mean: {esc(m.get('mean_interval', ''))}. Accuracies (0/1 per sample): "
           f"{esc(m.get('accuracy_test', ''))}; the counts in brackets are the discordant pairs (condition right only vs "
           f"reference right only). Other metrics: {esc(m.get('continuous_test', ''))}; {esc(m.get('deterministic', ''))}. "
           f"p: raw / Holm-adjusted ({esc(m.get('p_values', ''))}); <b>bold</b>: Holm p &lt; 0.05. mde: "
           f"{esc(m.get('mde', ''))}. {esc(m.get('min_n', ''))}. Overlap: {esc(m.get('overlap', ''))}. "
           f"All rows: <code>effect_tests</code> ({esc(rel)}).</p>"]
    if stats.get("warnings"):
        out.append('<div class="warn"><ul>' + "".join(f"<li>{esc(w)}</li>" for w in stats["warnings"]) + "</ul></div>")
    controls = {r["condition"]: r["reference"] for r in rows if r["reference"] not in ("", "baseline")}
    conds = list(stats.get("conditions", {}))
    blind = stats.get("blind")
    shown: list[Path] = []

    def figs(*names: str) -> str:
        got = [f for f in figures if f.name in names]
        shown.extend(got)
        return '<div class="figs">' + "".join(figure_html(contained(run, f), f.name, wide=True) for f in got) + "</div>"

    head = ("<tr><th rowspan=2>condition</th><th rowspan=2>tokens acted on (mean)</th><th rowspan=2>n</th><th rowspan=2>mean</th>"
            f"<th rowspan=2>{conf}% interval</th><th colspan=4>minus the baseline</th><th colspan=6>minus the matched control</th></tr>"
            "<tr><th>diff</th><th>interval</th><th>p / Holm</th><th>mde</th><th>control</th><th>overlap with target</th>"
            "<th>diff</th><th>interval</th><th>p / Holm</th><th>mde</th></tr>")
    for metric in stats.get("accuracy_metrics", []):
        from embedlens.figures import safe_name

        body = []
        said: list[tuple[str, dict | None]] = []
        b = index.get(("baseline", "", metric, "all", "all"))
        if b is not None:
            body.append(f"<tr><td><b>baseline</b></td><td class=\"num\">0</td><td class=\"num\">{b['n']}</td><td class=\"num\">{b['mean']:.3f}</td>"
                        f"<td class=\"num\">{esc(_ci(b['mean_ci_low'], b['mean_ci_high']))}</td>" + "<td></td>" * 10 + "</tr>")
        for c in conds:
            vb = index.get((c, "baseline", metric, "all", "all"))
            ctrl = controls.get(c)
            vc = index.get((c, ctrl, metric, "all", "all")) if ctrl else None
            r = vb or vc
            if r is None:
                continue
            name = f"<b>{esc(c)}</b> (blind: every visual token removed)" if c == blind else esc(c)
            body.append(f"<tr><td>{name}</td><td class=\"num\">{r['tokens_touched']:.1f}</td><td class=\"num\">{r['n']}</td>"
                        f"<td class=\"num\">{r['mean']:.3f}</td><td class=\"num\">{esc(_ci(r['mean_ci_low'], r['mean_ci_high']))}</td>"
                        + _diff_cell(vb) + f"<td>{esc(ctrl or '')}</td>" + _overlap_cell(vc) + _diff_cell(vc if ctrl else None) + "</tr>")
            said.append((f"{c} vs the baseline", vb))
            if ctrl:
                said.append((f"{c} vs {ctrl}", vc))
        out.append(f"<h3>{esc(metric)}</h3><table>{head}{''.join(body)}</table>")
        out.append(f"<h4>What the {esc(metric)} comparisons support</h4>" + _sentences(said))
        sm = safe_name(metric)
        out.append(figs(f"effects_{sm}.png", f"effects_paired_{sm}.png"))
        for by in stats.get("breakdown", []):
            groups = list(dict.fromkeys(str(r["group"]) for r in rows if r["by"] == by and r["metric"] == metric))
            trows = []
            for c in ["baseline", *conds]:
                cells = []
                for g in groups:
                    r = index.get((c, "", metric, by, g)) if c == "baseline" else (
                        index.get((c, "baseline", metric, by, g)) or index.get((c, controls.get(c), metric, by, g)))
                    cells.append("<td></td>" if r is None else
                                 f"<td class=\"num\">{r['mean']:.2f} <span class=\"note\">{esc(_ci(r['mean_ci_low'], r['mean_ci_high']))} n={r['n']}</span></td>")
                trows.append(f"<tr><td>{esc(c)}</td>{''.join(cells)}</tr>")
            out.append(f"<h3>{esc(metric)} by {esc(by)}</h3><table><tr><th>condition</th>"
                       + "".join(f"<th>{esc(g)}</th>" for g in groups) + "</tr>" + "".join(trows) + "</table>")
            out.append(figs(f"effects_by_{safe_name(by)}_{sm}.png"))
        for base in stats.get("sweeps", {}):
            out.append(f"<h3>{esc(base)}: {esc(metric)} against tokens removed</h3>" + figs(f"effects_sweep_{safe_name(base)}_{sm}.png"))
    maps = [f for f in figures if f.name.startswith("removed_")]
    if maps:
        drawn = stats.get("token_map_samples")
        which = (f"The first {len(drawn)} samples that have an image are drawn (a video frame by frame) ({esc(', '.join(map(str, drawn)))}); "
                 "every sample's tokens are in <code>touched_tokens</code>." if drawn else "")
        out.append("<h3>Which tokens each condition and its control acted on</h3>"
                   f'<p class="note">{which}</p>' + figs(*[f.name for f in maps]))
    others = [r for r in rows if r["by"] == "all" and r["metric"] not in stats.get("accuracy_metrics", []) and r["condition"] != "baseline"]
    if others:
        trs = []
        for r in others:
            ref = r["reference"] or "(none)"
            trs.append(f"<tr><td>{esc(r['condition'])}</td><td>{esc(r['metric'])}</td><td>{esc(ref)}</td><td class=\"num\">{r['n']}</td>"
                       f"<td class=\"num\">{r['mean']:.4g}</td><td class=\"num\">{esc(_ci(r['mean_ci_low'], r['mean_ci_high']))}</td>"
                       + (_diff_cell(r) if r["reference"] else "<td></td>" * 4) + f"<td>{esc(r.get('verdict') or '')}</td></tr>")
        out.append("<h3>Other metrics (paired sign-flip permutation tests)</h3><table><tr><th>condition</th><th>metric</th><th>reference</th>"
                   f"<th>n</th><th>mean</th><th>{conf}% interval</th><th>diff</th><th>interval</th><th>p / Holm</th><th>mde</th>"
                   "<th>what it supports</th></tr>" + "".join(trs) + "</table>")
    return "".join(out), shown

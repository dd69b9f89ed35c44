"""Token maps of several runs on one colour scale, for `embedlens compare`.

Each run draws its own maps with its own colours (a word map colours that
run's most frequent words; a heat map may span that image's range). Put side
by side, two such maps cannot be read against each other. Here the maps are
drawn again from the per-token tables the runs wrote (``sample_id``, ``row``,
``col`` and a value per token), one figure per quantity, a row per run and a
column per shared sample, with one norm (heat maps: the minimum and maximum
over every panel) or one colour per category (token groups fixed, words by
their frequency over all runs) shared by every panel. The tables hold no
pixels, so the maps are the patch grids without the image underneath.
"""

from __future__ import annotations

import collections
import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from embedlens.files import contained

#: Columns drawn as a map, what kind of map, and the quantity they hold (the colour bar's or legend's label).
MAP_COLUMNS = (
    ("group", "category", "token group"),
    ("normalized_entropy", "value", "similarity entropy / log V"),
    ("token_1", "word", "nearest vocabulary word (top-1)"),
)
#: At most this many shared samples (the columns of a map) and layers (one map each) per table.
MAX_SAMPLES = 4
MAX_LAYERS = 4
#: Patch grids larger than this per side are not drawn (a table from anywhere may claim any row and column).
MAX_GRID = 256
#: Words given their own colour on a word map (the rest grey), by frequency over every run's panels; a category map
#: with more categories than this is coloured the same way.
TOP_WORDS = 12
#: Labels are cut to this many characters (a table may hold any text).
MAX_LABEL = 40


def _columns(path: Path, wanted: list[str], ids: list[str] | None = None) -> dict[str, list]:
    """The `wanted` columns a table has, on the rows of samples `ids` (all rows without): Parquet read column by
    column and filtered before it becomes Python values (a real run's table has millions of rows); CSV whole."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        have = set(pq.read_schema(path).names)
        t = pq.read_table(path, columns=[c for c in wanted if c in have])
        if ids is not None and "sample_id" in t.column_names:
            t = t.filter(pc.is_in(pc.cast(t.column("sample_id"), pa.string()), value_set=pa.array(ids, pa.string())))
        return {c: t.column(c).to_pylist() for c in t.column_names}
    from embedlens.report import read_rows

    rows = read_rows(path)
    if ids is not None:
        keep = set(ids)
        rows = [r for r in rows if str(r.get("sample_id")) in keep]
    return {c: [r.get(c) for r in rows] for c in wanted if rows and c in rows[0]}


def _shared_ids(paths: list[Path]) -> list[str]:
    """The first `MAX_SAMPLES` sample ids of the first table (in its order) that every table has."""
    seen = [list(dict.fromkeys(str(x) for x in _columns(p, ["sample_id"]).get("sample_id", []))) for p in paths]
    others = [set(s) for s in seen[1:]]
    return [s for s in seen[0] if all(s in o for o in others)][:MAX_SAMPLES]


def _grid_ok(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_GRID


def collect(runs: list[Path], manifests: list[dict], warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """The maps every run can give: ``[{"table", "column", "kind", "label", "layer", "panels": {run index:
    [(sample_id, grid)]}}]`` where a grid is a ``[rows, cols]`` array (float, NaN where no token; or object, None).

    A table that cannot be read leaves its maps out, with a line in `warnings`; the rest of the comparison stands."""
    import pyarrow

    tables: list[dict[str, str]] = [m.get("tables") if isinstance(m.get("tables"), dict) else {} for m in manifests]
    shared = [k for k in tables[0] if all(k in t for t in tables[1:]) and k.endswith("tokens")]
    found: list[dict[str, Any]] = []
    drawn: set[str] = set()
    for key in sorted(shared, key=lambda k: (not k.startswith(("token_partition", "tokens")), k)):  # the partition's own first
        paths = [contained(run, t[key]) if isinstance(t[key], str) else None for run, t in zip(runs, tables)]
        if any(p is None for p in paths):
            continue
        try:
            ids = _shared_ids(paths)
            data = [_columns(p, ["sample_id", "row", "col", "image", "tile", "layer", *(c for c, _, _ in MAP_COLUMNS)], ids) for p in paths]
        except (OSError, ValueError, UnicodeDecodeError, csv.Error, pyarrow.ArrowException) as e:  # csv.Error: e.g. a field past csv's size limit
            if warnings is not None:
                warnings.append(f"table {key!r} of one of the runs could not be read ({type(e).__name__}: {e}); its maps are left out")
            continue
        if not ids or any(not {"sample_id", "row", "col"} <= set(d) for d in data):
            continue
        for column, kind, label in MAP_COLUMNS:
            if column in drawn or not all(column in d for d in data):
                continue
            layers = [None]
            if all("layer" in d for d in data):
                common = set.intersection(*(set(x for x in d["layer"] if _grid_ok(x)) for d in data))
                layers = sorted(common)[:MAX_LAYERS] if kind == "word" else sorted(common)[:1]
                if not layers:
                    continue
            for layer in layers:
                panels = _panels(data, column, kind, layer)
                if panels:
                    found.append({"table": key, "column": column, "kind": kind, "label": label, "panels": panels,
                                  "layer": None if kind == "category" else layer})  # a token's group is the same at every layer
            drawn.add(column)  # one map of the groups, however many tables carry them
    return found


def _panels(data: list[dict[str, list]], column: str, kind: str, layer: int | None) -> dict[int, list] | None:
    """Each run's grids of `column` for the first shared samples (image 0, tile 0; at `layer` where given)."""
    keep = []
    for d in data:
        n = len(d["sample_id"])
        image, tile, lay = d.get("image") or [0] * n, d.get("tile") or [0] * n, d.get("layer") or [None] * n
        ok = [i for i in range(n) if _grid_ok(d["row"][i]) and _grid_ok(d["col"][i]) and image[i] in (0, None)
              and tile[i] in (0, None) and (layer is None or lay[i] == layer)]
        keep.append(ok)
    rows_of: list[dict[str, list[int]]] = []  # per run: sample id -> its rows
    for d, k in zip(data, keep):
        by: dict[str, list[int]] = {}
        for i in k:
            by.setdefault(str(d["sample_id"][i]), []).append(i)
        rows_of.append(by)
    ids = [s for s in rows_of[0] if all(s in by for by in rows_of[1:])][:MAX_SAMPLES]
    if not ids:
        return None
    out: dict[int, list] = {}
    for r, d in enumerate(data):
        out[r] = []
        for sid in ids:
            idx = rows_of[r][sid]
            shape = (max(d["row"][i] for i in idx) + 1, max(d["col"][i] for i in idx) + 1)
            grid = np.full(shape, np.nan) if kind == "value" else np.full(shape, None, dtype=object)
            for i in idx:
                v = d[column][i]
                if kind == "value":
                    grid[d["row"][i], d["col"][i]] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else np.nan
                else:
                    grid[d["row"][i], d["col"][i]] = None if v is None else str(v)[:MAX_LABEL]
            out[r].append((sid, grid))
    return out


def shared_scale(m: dict[str, Any]) -> tuple[Any, Any, dict[str, str]]:
    """One colour map and norm for every panel of map `m`: ``(cmap, norm, colour per category)``.

    Heat maps: magma from the smallest to the largest value of any panel. Category and word maps: a fixed colour
    per category (token groups as in each run's own maps; words by their count over all panels, grey past
    `TOP_WORDS`), encoded as integer codes under one listed colour map."""
    from matplotlib.colors import ListedColormap, Normalize

    from embedlens.figures import OTHER_COLOUR, WORD_COLOURS, category_colours

    grids = [g for panels in m["panels"].values() for _, g in panels]
    if m["kind"] == "value":
        vals = np.concatenate([g[~np.isnan(g)] for g in grids]) if grids else np.zeros(0)
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
        return "magma", Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-12), {}
    counts = collections.Counter(str(x) for g in grids for x in g.ravel() if x is not None)
    if m["kind"] == "word" or len(counts) > TOP_WORDS:
        top = [w for w, _ in counts.most_common(min(TOP_WORDS, len(WORD_COLOURS)))]
        colours = {w: WORD_COLOURS[i] for i, w in enumerate(top)}
        if len(counts) > len(top):
            colours["other"] = OTHER_COLOUR
    else:
        colours = category_colours(sorted(counts))
    names = list(colours)
    return ListedColormap([colours[n] for n in names]), Normalize(vmin=-0.5, vmax=len(names) - 0.5), colours


def codes(grid: np.ndarray, colours: dict[str, str]) -> np.ndarray:
    """A category grid as integer codes into `colours` (words without a colour: ``other``; no token: NaN)."""
    names = list(colours)
    out = np.full(grid.shape, np.nan)
    for (r, c), v in np.ndenumerate(grid):
        if v is not None:
            out[r, c] = names.index(v) if v in colours else names.index("other")
    return out


def draw(m: dict[str, Any], names: list[str]):
    """The figure of map `m`: a row per run, a column per sample, every panel under the one scale of `shared_scale`."""
    from matplotlib.patches import Patch

    from embedlens.figures import LABEL_BACKING, _plt, _wrap, label_fits, literal

    plt = _plt()
    cmap, norm, colours = shared_scale(m)
    runs = sorted(m["panels"])
    n_cols = len(m["panels"][runs[0]])
    panel = 2.6
    width = panel * n_cols + 2.8
    fig, axes = plt.subplots(len(runs), n_cols, figsize=(width, panel * len(runs) + 1.0), squeeze=False)
    image = None
    for i, r in enumerate(runs):
        for j, (sid, grid) in enumerate(m["panels"][r]):
            ax = axes[i][j]
            shown = grid if m["kind"] == "value" else codes(grid, colours)
            image = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest")
            if m["kind"] == "word":
                patch_pts = panel * 72 / max(grid.shape)
                fs = max(4.0, min(7.0, patch_pts * 0.45))
                for (y, x), w in np.ndenumerate(grid):
                    if w is not None and label_fits(str(w), patch_pts, fs):
                        ax.text(x, y, literal(str(w)), ha="center", va="center", fontsize=fs, bbox=LABEL_BACKING)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(literal(sid), fontsize=8)
            if j == 0:
                ax.set_ylabel(literal(names[r]), fontsize=9)
    if m["kind"] == "value":
        fig.colorbar(image, ax=axes.ravel().tolist(), label=m["label"] + " (one scale for every run)", fraction=0.03)
    else:
        fig.legend(handles=[Patch(facecolor=c, label=literal(n)) for n, c in colours.items()], loc="center right", fontsize=8,
                   title=m["label"], title_fontsize=8)
    layer = "" if m["layer"] is None else f", LLM layer {m['layer']}"
    fig.suptitle(_wrap(f"{literal(m['table'])}: {m['label']}{layer}, per patch; a row per run, one colour scale for every panel", width),
                 fontsize=9)
    return fig


def joint_maps(names: list[str], runs: list[Path], manifests: list[dict], out: Path, warnings: list[str] | None = None) -> list[Path]:
    """Draw every map the runs share into ``out/maps/``; returns the files."""
    from embedlens.figures import _save, safe_name

    paths = []
    for m in collect(runs, manifests, warnings):
        fig = draw(m, names)
        layer = "" if m["layer"] is None else f"_l{m['layer']}"
        paths.append(_save(fig, out / "maps" / f"{safe_name(m['table'])}_{safe_name(m['column'])}{layer}.png", tight=False))
    return paths

"""Word maps stay readable at real grids (24x24, 27x27): a colour per frequent word, labels only where they fit."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from embedlens import figures
from embedlens.figures import OTHER_COLOUR, WORD_COLOURS, label_fits, word_map


def _panel(grid: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    words = ["sky", "red", "background", "a", "cat"]
    rows = [r for r in range(grid) for _ in range(grid)]
    cols = [c for _ in range(grid) for c in range(grid)]
    # planted frequencies: background most, then sky, red, cat, a
    weights = torch.tensor([0.25, 0.15, 0.5, 0.02, 0.08])
    labels = [words[i] for i in torch.multinomial(weights, grid * grid, replacement=True, generator=g).tolist()]
    return {"sample_id": f"s{seed}", "pixels": torch.rand(grid * 14, grid * 14, 3, generator=g), "row": rows, "col": cols, "labels": labels}


@pytest.fixture
def captured(monkeypatch):
    got = {}
    save = figures._save

    def capture(fig, path, tight=True):
        got["fig"] = fig
        got["texts"] = [t.get_text() for ax in fig.axes for t in ax.texts]
        got["legend"] = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        got["faces"] = [p.get_facecolor() for ax in fig.axes for p in ax.patches]
        return save(fig, path, tight)

    monkeypatch.setattr(figures, "_save", capture)
    return got


@pytest.mark.parametrize("grid", [24, 27])
def test_word_map_at_real_grids(grid, tmp_path, captured):
    import collections

    from matplotlib.colors import to_rgba

    panels = [_panel(grid, s) for s in range(3)]
    path = word_map(panels, tmp_path / "map.png", title="a long title " * 12, top=3)
    counts = collections.Counter(w for p in panels for w in p["labels"])
    top = [w for w, _ in counts.most_common(3)]
    # the legend lists the three most frequent words with their counts, then the rest as "other"
    assert captured["legend"][:3] == [f"{w} ({counts[w]})" for w in top]
    assert captured["legend"][3] == f"other ({sum(counts.values()) - sum(counts[w] for w in top)})"
    # every patch is coloured: its word's colour when frequent, grey otherwise
    faces = captured["faces"]
    n = grid * grid * 3
    want = [to_rgba(WORD_COLOURS[top.index(w)] if w in top else OTHER_COLOUR, 0.55) for p in panels for w in p["labels"]]
    assert len(faces) == n and [tuple(round(x, 3) for x in f) for f in faces] == [tuple(round(x, 3) for x in f) for f in want]
    # labels only where they fit: short words yes, "background" never at these grids
    assert captured["texts"] and "background" not in captured["texts"]
    assert set(captured["texts"]) <= {"sky", "red", "a", "cat"}
    im = Image.open(path)
    assert im.width > 2.5 * im.height  # three samples side by side


def test_label_fits_by_hand():
    # 6x6 grid on a 3.6 in panel: 43 pt patches; 24x24: 10.8 pt
    assert not label_fits("background", 43.2, 8)  # 10 chars x 0.6 x 8 pt = 48 pt > 0.92 x 43.2 pt
    assert label_fits("background", 60, 8)  # 48 pt <= 55.2 pt
    assert not label_fits("background", 10.8, 4.9)
    assert label_fits("red", 10.8, 4.9) and not label_fits("ab", 4.0, 4.9)


def test_sweep_curve_draws_copies_that_touch_as_many_tokens(tmp_path):
    """Two sweep copies acting on the same number of tokens (an in-LLM method at budgets below what its first
    layers hold) used to make the sort compare their result rows (dicts) and fail the run's figures."""
    from embedlens.conclusion_figures import sweep_curve
    from embedlens.plan.conclusions import COLUMNS, Conclusions

    c = Conclusions()
    for name, mean in (("m[keep=0.3]", 0.5), ("m[keep=0.1]", 0.25)):
        row = dict.fromkeys(COLUMNS, 0.0) | {"condition": name, "reference": "baseline", "metric": "correct", "by": "all",
                                              "group": "all", "mean": mean, "mean_ci_low": mean - 0.1, "mean_ci_high": mean + 0.1}
        for k in COLUMNS:
            c.rows[k].append(row[k])
        c.touched[name] = 35.0
    c.sweeps = {"m": ["m[keep=0.3]", "m[keep=0.1]"]}
    path = sweep_curve(c, "correct", "m", tmp_path / "sweep.png")
    assert path.is_file()


def test_words_that_look_like_mathtext_are_drawn_as_written(tmp_path, captured):
    """A vocabulary word or a sample id such as `$\\alpha$` (real tokenizers hold LaTeX pieces) is drawn as written:
    unescaped, matplotlib typesets it, and `$\\foo$` stops the whole report with a parse error."""
    words = ["$\\foo$", "$x$"]
    panel = {"sample_id": "$id$", "pixels": torch.rand(28, 28, 3), "row": [0, 0, 1, 1], "col": [0, 1, 0, 1],
             "labels": [words[0], words[1], words[0], words[0]]}
    path = word_map([panel], tmp_path / "map.png", top=2)
    assert path.exists()
    fig = captured["fig"]
    # what matplotlib would draw: every `$` escaped, so no text is parsed as math
    drawn = captured["texts"] + captured["legend"] + [ax.get_title() for ax in fig.axes]
    assert drawn and all("$" not in t.replace("\\$", "") for t in drawn)
    assert "\\$\\foo\\$ (3)" in captured["legend"] and "\\$id\\$ (2x2)" in [ax.get_title() for ax in fig.axes]

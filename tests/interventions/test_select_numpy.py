"""One selection evaluator, two array libraries: on NumPy role maps (what `validate` counts pools on, without
torch) every selection gives exactly the mask it gives on torch tensors (what a run evaluates)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedlens.errors import InterventionError
from embedlens.interventions.prune import PruneRandomMatched
from embedlens.interventions.select import Selection, visual_index
from embedlens.plan.pools import _counts, fixed_layout
from embedlens.roles import Role, TokenRoles

FIELDS = ("kind", "image", "tile", "row", "col", "feature_row", "feature_col", "frame")


def _sample(grid, n_images, cls, newline, video, answer, rng):
    """Columns of one sample: text around `n_images` images of `grid`, an optional CLS and row-end newlines."""
    h, w = grid
    cols = {f: [] for f in FIELDS}

    def put(kind, image=-1, row=-1, col=-1, frame=-1):
        for f, v in zip(FIELDS, (kind, image, 0 if image >= 0 else -1, row, col, image, -1, frame)):
            cols[f].append(int(v))

    put(Role.BOS)
    for _ in range(int(rng.integers(1, 4))):
        put(Role.TEMPLATE)
    for i in range(n_images):
        if cls:
            put(Role.IMAGE_CLS, i)
        for r in range(h):
            for c in range(w):
                put(Role.VISUAL, i, r, c, i if video else -1)
            if newline:
                put(Role.IMAGE_NEWLINE, i)
    for _ in range(int(rng.integers(1, 5))):
        put(Role.QUESTION)
    for _ in range(answer):
        put(Role.ANSWER)
    put(Role.SPECIAL)
    return cols


def _layouts():
    """(name, torch roles, numpy roles): batches of 1-3 samples with 1-3 images, with/without CLS, newlines,
    video frames, answers, and left or right padding."""
    rng = np.random.default_rng(0)
    out = []
    for n, (grid, cls, newline, video, side) in enumerate([
        ((2, 3), False, False, False, "right"), ((3, 3), True, False, False, "left"),
        ((2, 2), False, True, True, "right"), ((4, 4), True, True, False, "left"), ((1, 5), False, False, True, "left"),
    ]):
        samples = [_sample(grid, 1 + (n + b) % 3, cls, newline, video, answer=b % 2 * 2, rng=rng) for b in range(1 + n % 3)]
        seq = max(len(s["kind"]) for s in samples)
        table = {f: [] for f in FIELDS}
        for s in samples:
            pad = seq - len(s["kind"])
            for f in FIELDS:
                filler = [int(Role.PAD) if f == "kind" else -1] * pad
                table[f].append(filler + s[f] if side == "left" else s[f] + filler)
        arrays = {f: np.array(v, dtype=np.int64) for f, v in table.items()}
        out.append((f"{grid}-cls{int(cls)}-nl{int(newline)}-video{int(video)}-{side}",
                    TokenRoles(**{f: torch.from_numpy(a.copy()) for f, a in arrays.items()}), TokenRoles(**arrays)))
    for grid, k, cls in [((4, 4), 1, False), ((6, 6), 3, True), ((2, 3), 2, False)]:  # what validate counts on
        out.append((f"fixed{grid}x{k}-cls{int(cls)}", fixed_layout(grid, k, cls), fixed_layout(grid, k, cls, numpy=True)))
    return out


LAYOUTS = _layouts()

SELECTIONS = [
    "visual", "image_newline", "image_cls", "image_span", "text", "template", "question", "answer", "bos", "special",
    "last", "padding", "all", "none",
    "row < 2", "col >= 1", "image == 1", "tile == 0", "frame == 1", "position > 5", "index <= 3", "index != 2",
    "1 < row <= 2", "visual and row < 7", "visual and index % 2 == 0", "visual & col % 3 != 1",
    "index in [0, 3, 5, 40]", "row not in [0]", "visual and image in [0, 2]",
    "not visual", "bos | ~text", "(visual or image_cls) and not (row == 0 and col == 0)",
    "3 in [1, 2]", "2 < 3", "not (2 < 3)", "2 < 3 and not 4 in [4]", "0 in [0] or none", "not 3 >= 3 or visual",
    "visual and frame >= 1 or question", "position % 4 == 1 and not padding", "-row > -2", "all and not last",
    "image_span and index < 5", "none or last",
    [0, 1, 2], [3, 7, 100], [],
]


@pytest.mark.parametrize("spec", SELECTIONS, ids=str)
def test_a_selection_on_numpy_roles_is_its_torch_mask(spec):
    sel = Selection.parse(spec)
    for name, rt, rn in LAYOUTS:
        want = sel.evaluate(rt)
        got = sel.evaluate(rn)
        assert isinstance(got, np.ndarray) and got.dtype == np.bool_ and got.shape == tuple(want.shape), (spec, name)
        assert np.array_equal(got, want.numpy()), (spec, name)


def test_the_role_map_members_agree():
    for name, rt, rn in LAYOUTS:
        for f in FIELDS:
            assert np.array_equal(getattr(rn, f), getattr(rt, f).numpy()), (name, f)
        assert np.array_equal(rn.last_index, rt.last_index.numpy()), name
        assert np.array_equal(visual_index(rn), visual_index(rt).numpy()), name
        # an independent count: the n-th visual token of each sample
        vis = rn.kind == int(Role.VISUAL)
        for b in range(vis.shape[0]):
            assert visual_index(rn)[b][vis[b]].tolist() == list(range(int(vis[b].sum()))), name


@pytest.mark.parametrize("spec", ["row", "visual and row", "index in 3", "row % 2", "-index"])
def test_a_selection_that_is_no_mask_is_refused_alike(spec):
    sel = Selection.parse(spec)
    _, rt, rn = LAYOUTS[0]
    with pytest.raises(Exception) as on_torch:
        sel.evaluate(rt)
    with pytest.raises(Exception) as on_numpy:
        sel.evaluate(rn)
    assert type(on_numpy.value) is type(on_torch.value) is InterventionError
    assert str(on_numpy.value) == str(on_torch.value)


@pytest.mark.parametrize("target, pool", [("visual and row < 7", "visual"), ("index < 28", "visual"),
                                          ("visual and index % 2 == 0", "image_span"), ([0, 5], "visual and col > 0")])
def test_pool_counts_on_a_numpy_layout_are_the_torch_counts(target, pool):
    iv = PruneRandomMatched(target=target, pool=pool)
    for grid, k, cls in [((4, 4), 1, False), ((6, 6), 2, False), ((3, 5), 3, True)]:
        nt, npool = _counts(fixed_layout(grid, k, cls), None, iv)
        mt, mpool = _counts(fixed_layout(grid, k, cls, numpy=True), None, iv)
        assert (int(nt[0]), int(npool[0])) == (int(mt[0]), int(mpool[0])), (target, grid, k)


@pytest.mark.parametrize("lead, swapped", [("~text | bos", "bos | ~text"), ("~(visual & row < 2)", "not (visual and row < 2)"),
                                           ("  ~visual", "not visual")])
def test_a_selection_may_start_with_not(lead, swapped):
    """`~` first is `not` first: it parsed as an indented line ("unexpected indent") before."""
    roles = fixed_layout((4, 4), 2, cls=True)
    assert torch.equal(Selection.parse(lead).evaluate(roles), Selection.parse(swapped).evaluate(roles))
    assert Selection.parse(lead).evaluate(roles).any()

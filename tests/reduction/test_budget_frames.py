"""Budgets per frame of a video (``per: frame``) or per whole video (``per: image``), against selections computed
frame by frame on their own; the random control drawn within frames; the pairing with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from embedlens import load_model
from embedlens.data import Sample
from embedlens.errors import InterventionError
from embedlens.interventions import Engine
from embedlens.reduction._rank import frame_groups
from embedlens.reduction.attention_ranked import visionzip_select, vispruner_select
from embedlens.reduction.baselines import RandomBudget
from embedlens.reduction.budget import Budget
from embedlens.reduction.dart import DART
from embedlens.reduction.diversity import DivPrune, cdpruner_select, divprune_select
from embedlens.reduction.fastv import FastVBudget
from embedlens.reduction.pyramiddrop import PyramidDrop, pdrop_schedule
from embedlens.reduction.sparsevlm import SparseVLM
from embedlens.roles import Role, TokenRoles


def _roles() -> TokenRoles:
    """Three samples of 40 positions: a video of 3 frames x 6 tokens; an image of 5 tokens then a video of 2 frames
    x 4; a video whose frames hold 4, 7 and 5 tokens (unequal, to test the grouping, not one family's layout)."""
    seq = 40
    kind = torch.full((3, seq), int(Role.QUESTION))
    kind[:, 0] = int(Role.BOS)
    image, frame = torch.full((3, seq), -1), torch.full((3, seq), -1)

    def put(b, start, img, frames):
        at = start
        for f, n in enumerate(frames):
            kind[b, at:at + n] = int(Role.VISUAL)
            image[b, at:at + n], frame[b, at:at + n] = img, f
            at += n
        return at

    put(0, 2, 0, [6, 6, 6])
    at = put(1, 1, 0, [5])
    frame[1, 1:at] = -1  # an image: no frame
    put(1, at + 2, 1, [4, 4])
    put(2, 3, 0, [4, 7, 5])
    kind[2, 30:] = int(Role.PAD)
    minus = torch.full_like(kind, -1)
    return TokenRoles(kind=kind, image=image, tile=torch.where(image >= 0, 0, -1), row=minus, col=minus,
                      feature_row=minus, feature_col=minus, frame=frame)


def _by_frame(roles: TokenRoles) -> list[torch.Tensor]:
    """`[batch, seq]` masks, one per (sample, image, frame) present: the groups a per-frame budget should see."""
    out = []
    for img in range(int(roles.image.max()) + 1):
        for f in range(-1, int(roles.frame.max()) + 1):
            m = (roles.image == img) & (roles.frame == f)
            if m.any():
                out.append(m)
    return out


def _brute_force(keep, scores, candidates, roles):
    """Highest scores first, earlier position on ties, `keep` of every (image, frame) of every sample, in Python."""
    out = torch.zeros_like(candidates)
    for b in range(scores.shape[0]):
        groups = {(int(roles.image[b, t]), int(roles.frame[b, t])) for t in range(scores.shape[1]) if candidates[b, t]}
        for img, f in groups:
            idx = [t for t in range(scores.shape[1])
                   if candidates[b, t] and int(roles.image[b, t]) == img and int(roles.frame[b, t]) == f]
            k = min(len(idx), math.ceil(len(idx) * keep) if isinstance(keep, float) else keep)
            out[b, sorted(idx, key=lambda t: (-float(scores[b, t]), t))[:k]] = True
    return out


@pytest.mark.parametrize("keep", [1, 3, 0.34, 1.0])
def test_a_budget_per_frame_is_each_frame_selected_on_its_own(keep):
    roles = _roles()
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, roles.kind.shape, generator=gen).double()  # many ties: one tie rule
    cand = roles.visual & (torch.rand(roles.kind.shape, generator=gen) < 0.9)
    got = Budget.parse(keep, per="frame").keep_mask(scores, cand, Budget.parse(keep, per="frame").groups(roles))
    # independent: the image-level budget run on one frame's candidates at a time, the kept sets put together
    alone = torch.zeros_like(cand)
    for m in _by_frame(roles):
        alone |= Budget.parse(keep).keep_mask(scores, cand & m, roles.image)
    assert torch.equal(got, alone)
    assert torch.equal(got, _brute_force(keep, scores, cand, roles))
    if isinstance(keep, int):  # exactly `keep` of every frame that has as many
        for m in _by_frame(roles):
            assert torch.equal((got & m).sum(1), torch.minimum((cand & m).sum(1), torch.tensor(keep)))


def test_a_budget_per_image_takes_the_whole_video_and_images_are_the_same_either_way():
    roles = _roles()
    gen = torch.Generator().manual_seed(5)
    scores = torch.rand(roles.kind.shape, generator=gen).double()
    cand = roles.visual
    whole = Budget.parse(5).keep_mask(scores, cand, Budget.parse(5).groups(roles))
    assert torch.equal(whole, Budget.parse(5).keep_mask(scores, cand, roles.image))  # the image-level behaviour
    for b in range(3):
        for img in range(2):
            m = cand[b] & (roles.image[b] == img)
            if m.any():  # 5 of the whole video, wherever its frames put them: the top 5 of its scores
                top = scores[b].masked_fill(~m, -1).topk(5).indices
                assert set(whole[b].nonzero().flatten().tolist()) >= set(top.tolist())
                assert int((whole[b] & m).sum()) == 5
    # a batch of images only: per frame is per image
    still = TokenRoles(kind=roles.kind, image=roles.image, tile=roles.tile, row=roles.row, col=roles.col,
                       feature_row=roles.feature_row, feature_col=roles.feature_col)
    assert torch.equal(frame_groups(still.image, still.frame), still.image)
    assert torch.equal(Budget.parse(0.4, per="frame").keep_mask(scores, cand, Budget.parse(0.4, per="frame").groups(still)),
                       Budget.parse(0.4).keep_mask(scores, cand, still.image))


def test_frame_groups_are_dense_per_sample_and_read_nothing_back():
    roles = _roles()
    groups = frame_groups(roles.image, roles.frame)
    assert groups[0, 2:20].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert groups[1][roles.visual[1]].tolist() == [0] * 5 + [1] * 4 + [2] * 4  # the image, then the video's frames
    assert groups[2][roles.visual[2]].tolist() == [0] * 4 + [1] * 7 + [2] * 5
    assert bool((groups[~roles.visual] == -1).all())
    budget = Budget.parse(2, per="frame")
    scores = torch.rand(roles.kind.shape, dtype=torch.float64)
    budget.keep_mask(scores, roles.visual, budget.groups(roles))  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        budget.keep_mask(scores, roles.visual, budget.groups(roles))
    syncs = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")
    assert {e.key: e.count for e in prof.key_averages() if e.key in syncs} == {}


SELECTIONS = {  # the methods' own selection functions, given (scores, features, candidates, groups, budget)
    "visionzip": lambda s, x, c, g, b: visionzip_select(s, x, c, g, b, 0.34)[0],
    "vispruner": lambda s, x, c, g, b: vispruner_select(s, x, c, g, b, 0.5),
    "divprune": lambda s, x, c, g, b: divprune_select(x, c, g, b),
    "cdpruner": lambda s, x, c, g, b: cdpruner_select(x, s + 0.1, c, g, b),  # a fixed relevance in (0, 1]
}


@pytest.mark.parametrize("keep", [3, 0.5])
@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_every_method_per_frame_equals_it_run_frame_by_frame(name, keep):
    roles = _roles()
    gen = torch.Generator().manual_seed(11)
    scores = torch.rand(roles.kind.shape, generator=gen)
    x = torch.randn(*roles.kind.shape, 8, generator=gen)
    cand = roles.visual
    per_frame = Budget.parse(keep, per="frame")
    got = SELECTIONS[name](scores, x, cand, per_frame.groups(roles), per_frame)
    alone = torch.zeros_like(cand)
    for m in _by_frame(roles):
        alone |= SELECTIONS[name](scores, x, cand & m, roles.image, Budget.parse(keep)) & m
    assert torch.equal(got, alone)


# -- on a tiny Qwen2-VL video batch ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def video():
    adapter = load_model("tiny:qwen2_vl")
    rng = np.random.default_rng(0)
    frames = lambda n: [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(n)]  # noqa: E731
    batch = adapter.encode([Sample(video=frames(6), question="what moves?", id="a"),
                            Sample(video=frames(5), question="which colour?", id="b")], padding_side="left")
    return adapter, batch  # 3 temporal patches of 4 x 4 tokens per video


def _kept(adapter, batch, iv):
    ctx = Engine(adapter).context(batch)
    iv.setup(ctx)
    return ctx.roles.visual & ctx.valid & (ctx.exit > 0)


@pytest.fixture(scope="module")
def onevision():
    adapter = load_model("tiny:llava_onevision")
    rng = np.random.default_rng(1)
    frames = lambda n: [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(n)]  # noqa: E731
    batch = adapter.encode([Sample(video=frames(4), question="what moves?", id="a"),
                            Sample(video=frames(4), question="which colour?", id="b")], padding_side="left")
    return adapter, batch  # 4 frames of 2 x 2 pooled tokens per video, and a newline token (no frame) after them


@pytest.mark.parametrize("make", [lambda **k: RandomBudget(seed=2, **k), lambda **k: DivPrune(**k)], ids=["random", "divprune"])
@pytest.mark.parametrize("keep", [3, 0.25])
@pytest.mark.parametrize("family", ["video", "onevision"])
def test_on_a_video_each_frame_keeps_its_budget_chosen_within_it(request, family, make, keep):
    adapter, batch = request.getfixturevalue(family)
    roles = batch.roles
    sizes = roles.per_frame(roles.visual)  # [samples, frames]: tokens per frame
    got = _kept(adapter, batch, make(keep=keep, per="frame"))
    # the same method with the image-level budget, restricted to one frame (temporal patch) at a time
    alone = torch.zeros_like(got)
    for f in range(sizes.shape[1]):
        alone |= _kept(adapter, batch, make(keep=keep, tokens=f"visual and frame == {f}")) & (roles.frame == f)
    assert torch.equal(got, alone)
    count = (lambda n: min(keep, n)) if isinstance(keep, int) else (lambda n: math.ceil(n * keep))
    assert roles.per_frame(got).tolist() == [[count(n) for n in row] for row in sizes.tolist()]
    whole = _kept(adapter, batch, make(keep=keep))  # per: image: the budget of the whole video
    assert whole.sum(1).tolist() == [count(n) for n in sizes.sum(1).tolist()]


def test_the_random_control_draws_within_frames(video):
    """Per frame, every draw keeps `keep` of each frame (a draw over the whole video leaves the split to chance),
    and the tokens within a frame vary with the seed."""
    adapter, batch = video
    roles = batch.roles
    splits_frame, splits_video, picks = set(), set(), set()
    for seed in range(6):
        kept = _kept(adapter, batch, RandomBudget(keep=4, seed=seed, per="frame"))
        splits_frame.add(tuple(map(tuple, roles.per_frame(kept).tolist())))
        picks.add(tuple(kept[0].nonzero().flatten().tolist()))
        splits_video.add(tuple(map(tuple, roles.per_frame(_kept(adapter, batch, RandomBudget(keep=12, seed=seed))).tolist())))
    assert splits_frame == {((4, 4, 4), (4, 4, 4))}
    assert len(picks) == 6 and len(splits_video) > 1


IN_LLM = {  # (the method at a budget, its count of a 16-token frame after layer 1)
    "fastv_budget": (lambda **k: FastVBudget(keep=3, layer=1, count="after", **k), 3),
    "pyramiddrop": (lambda **k: PyramidDrop(keep=0.5, layers=[1], **k), None),
}


@pytest.mark.parametrize("name", sorted(IN_LLM))
def test_in_llm_methods_per_frame_rank_within_each_frame(video, name):
    adapter, batch = video
    roles = batch.roles
    make, k = IN_LLM[name]
    out = Engine(adapter).run(batch, [make(per="frame")])
    got = roles.visual & (out.context.exit > 1)
    # the attention that ranks at layer 1 is the same in every run (nothing is dropped before it): one frame at a time
    alone = torch.zeros_like(got)
    for f in range(3):
        one = Engine(adapter).run(batch, [make(tokens=f"visual and frame == {f}")])
        alone |= roles.visual & (one.context.exit > 1) & (roles.frame == f)
    assert torch.equal(got, alone)
    if k is None:  # PyramidDrop's one stage keeps floor(n * lambda) of each frame's n = 16
        k = int(pdrop_schedule(torch.tensor(8), torch.tensor(16), [1], adapter.n_llm_layers)[0])
    assert roles.per_frame(got).tolist() == [[k] * 3] * 2


def test_per_is_checked_and_refused_by_the_methods_that_choose_per_image():
    with pytest.raises(InterventionError, match="per: expected 'image'"):
        RandomBudget(keep=4, per="video")
    with pytest.raises(InterventionError, match="per: dart takes its budget per image"):
        DART(keep=8, per="frame")
    with pytest.raises(InterventionError, match="per: sparsevlm takes its budget per image"):
        SparseVLM(keep=8, per="frame")


def test_a_budget_per_frame_is_paired_with_the_random_control_per_frame():
    from embedlens.plan.effects import matched_controls
    from embedlens.interventions.condition import Condition

    conds = [Condition(name=n, interventions=[iv]) for n, iv in [
        ("rand_image", RandomBudget(keep=4)), ("rand_frame", RandomBudget(keep=4, per="frame")),
        ("div_frame", DivPrune(keep=4, per="frame")), ("div_image", DivPrune(keep=4)),
        ("div_other", DivPrune(keep=5, per="frame"))]]
    assert matched_controls(conds) == {"div_frame": "rand_frame", "div_image": "rand_image"}

"""The synthetic video set against its own pixels: objects move as stated, the per-frame truth is what lies
under each patch, still objects stay put, and a saved set reads back as a prompts file."""

from __future__ import annotations

import numpy as np
import pytest

from embedlens.data import read_records
from embedlens.errors import InputError
from embedlens.synthetic import COLOURS
from embedlens.synthetic_video import DIRECTIONS, SyntheticVideoSpec, make_video_records, render_video, save_video


def _pixels_of(frame, colour: str) -> np.ndarray:
    return (np.asarray(frame) == np.array(COLOURS[colour])).all(-1)


@pytest.mark.parametrize("seed", range(6))
def test_a_lone_object_moves_speed_pixels_a_frame_in_its_direction(seed):
    spec = SyntheticVideoSpec(n=1, seed=seed, objects=1, frames=6, speed=5, still_rate=0.3)
    clip = render_video(spec, 0)
    (o,) = clip.objects
    dx, dy = DIRECTIONS[o["direction"]]
    centroids = []
    for scene in clip.scenes:
        ys, xs = np.nonzero(_pixels_of(scene.image, o["colour"]))
        assert len(xs) > 0  # never leaves the frame
        centroids.append((xs.mean(), ys.mean()))
    steps = np.diff(np.array(centroids), axis=0)
    assert np.allclose(steps, [[dx * 5, dy * 5]] * 5)


def test_the_truth_of_each_frame_is_what_lies_under_each_patch():
    spec = SyntheticVideoSpec(n=3, seed=1, size=64, frames=4, objects=3, patch_grid=8)
    for rec in make_video_records(spec):
        truth = rec.meta["frame_patch_labels"]
        assert np.array(truth["kind"]).shape == (4, 8, 8)
        for f, frame in enumerate(rec.video):
            px = np.asarray(frame).reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(8, 8, 64, 3)
            for r in range(8):
                for c in range(8):
                    shares = {name: (px[r, c] == np.array(rgb)).all(-1).mean() for name, rgb in COLOURS.items()}
                    colour = truth["colour"][f][r][c]
                    if colour is None:  # background: no object colour covers more than half the patch (ties go to background)
                        assert truth["kind"][f][r][c] == "background" and max(shares.values()) <= 0.5
                    else:  # an object: its colour is the patch's most common object colour
                        assert truth["kind"][f][r][c] == "object" and max(shares, key=shares.get) == colour


def test_still_objects_keep_their_truth_and_moving_ones_do_not():
    spec = SyntheticVideoSpec(n=8, seed=3, objects=1, frames=4, speed=8, still_rate=0.5)
    seen = set()
    for rec in make_video_records(spec):
        kinds = np.array(rec.meta["frame_patch_labels"]["kind"])
        still = rec.meta["objects"][0]["direction"] == "still"
        seen.add(still)
        assert (kinds == kinds[0]).all() == still
    assert seen == {True, False}  # the seed gives both kinds


def test_same_seed_same_video_and_questions_answerable():
    a, b = make_video_records(SyntheticVideoSpec(n=4, seed=5)), make_video_records(SyntheticVideoSpec(n=4, seed=5))
    c = make_video_records(SyntheticVideoSpec(n=4, seed=6))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for ra, rb in zip(a, b) for x, y in zip(ra.video, rb.video))
    assert any(not np.array_equal(np.asarray(ra.video[0]), np.asarray(rc.video[0])) for ra, rc in zip(a, c))
    for rec in a:
        assert rec.answer in rec.meta["candidates"]
        if rec.meta["qtype"] == "direction":
            colour = rec.question.split("the ")[1].split()[0]
            assert rec.answer == next(o["direction"] for o in rec.meta["objects"] if o["colour"] == colour)
        if rec.meta["qtype"] == "count":
            assert rec.meta["candidates"].index(rec.answer) == sum(o["direction"] != "still" for o in rec.meta["objects"])


def test_a_saved_set_reads_back_as_a_prompts_file(tmp_path):
    spec = SyntheticVideoSpec(n=2, seed=2, frames=3)
    path = save_video(spec, str(tmp_path))
    recs = make_video_records(spec)
    for got, want in zip(read_records(path), recs):
        sample, _ = got.load()
        assert [np.asarray(f).tolist() for f in sample.video.frames] == [np.asarray(f).tolist() for f in want.video]
        assert sample.meta["frame_patch_labels"] == want.meta["frame_patch_labels"]
        assert (sample.question, sample.answer) == (want.question, want.answer)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"frames": 0}, "frames"), ({"objects": 5}, "objects"), ({"speed": 20, "frames": 8}, "speed"),
     ({"question_types": ("when",)}, "question_types"), ({"size": 8}, "size")],
)
def test_bad_parameters_name_the_key(kwargs, key):
    with pytest.raises(InputError, match=rf"synthetic_video\.{key}"):
        make_video_records(SyntheticVideoSpec(n=1, **kwargs))

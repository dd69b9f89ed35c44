"""A synthetic video data set: coloured shapes that move (or stay still) over a textured background, with the
ground truth of every patch of every frame.

Each video has `frames` frames; each object moves a fixed number of pixels per
frame left, right, up or down, or stays still, and never leaves the frame.
The truth of frame ``f`` is what `embedlens.synthetic.patch_truth` gives for
that frame (kind / colour / shape per patch, by majority over the patch's
pixels), stored as ``meta["frame_patch_labels"][attribute][f][row][col]``
for every frame of the source video: when `data.video.num_frames` keeps fewer
frames, kept frame ``j`` is source frame ``sample.video.indices[j]``. Objects
(``meta["objects"]``) carry their direction and their box in every frame.
Deterministic by seed.

>>> spec = SyntheticVideoSpec(n=2, frames=4, size=64, patch_grid=4)
>>> rec = make_video_records(spec)[0]
>>> sample, _ = rec.load()
>>> len(sample.video), sample.video.frames[0].size, len(sample.meta["frame_patch_labels"]["kind"])
(4, (64, 64), 4)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from embedlens.data import Record
from embedlens.errors import InputError
from embedlens.synthetic import COLOURS, COUNTS, SHAPES, Scene, _draw_shape, patch_truth

#: Directions an object moves in, as (dx, dy) per unit of speed; "still" objects do not move.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
VIDEO_QUESTION_TYPES = ("direction", "colour", "count")


@dataclass
class SyntheticVideoSpec:
    """Parameters of the synthetic video data set.

    Args:
        n: number of videos (one question each).
        seed: everything is drawn from this seed.
        size: frame side in pixels.
        frames: frames per video.
        objects: shapes per video (1..4), of distinct colours.
        object_size: an object's box side as a share of the frame side.
        speed: pixels an object moves per frame (those that move).
        still_rate: share of objects that stay still (static content across frames).
        texture: amplitude (0..1) of the static background's light texture.
        patch_grid: ground-truth patches per side (default 8).
        question_types: which questions to ask, cycled through the videos.
    """

    n: int = 16
    seed: int = 0
    size: int = 64
    frames: int = 8
    objects: int = 2
    object_size: float = 0.25
    speed: int = 4
    still_rate: float = 0.25
    texture: float = 0.08
    patch_grid: int = 8
    question_types: tuple[str, ...] = VIDEO_QUESTION_TYPES

    def check(self) -> None:
        """Raises InputError naming the parameter that is out of range."""
        if self.n < 1:
            raise InputError(f"synthetic_video.n: need at least 1 video; got {self.n}")
        if not 16 <= self.size <= 1024:
            raise InputError(f"synthetic_video.size: expected 16..1024 pixels; got {self.size}")
        if not 1 <= self.frames <= 256:
            raise InputError(f"synthetic_video.frames: expected 1..256; got {self.frames}")
        if not 1 <= self.objects <= 4:
            raise InputError(f"synthetic_video.objects: expected 1..4; got {self.objects}")
        if not 0.05 <= self.object_size <= 0.5:
            raise InputError(f"synthetic_video.object_size: expected a share in [0.05, 0.5]; got {self.object_size}")
        box = int(self.size * self.object_size)
        if not 0 <= self.speed * (self.frames - 1) <= self.size - box:
            raise InputError(f"synthetic_video.speed: {self.speed} pixels a frame over {self.frames} frames leaves a "
                             f"{self.size}-pixel frame (at most {(self.size - box) // max(1, self.frames - 1)})")
        if not 0.0 <= self.still_rate <= 1.0:
            raise InputError(f"synthetic_video.still_rate: expected a share in [0, 1]; got {self.still_rate}")
        if self.patch_grid is not None and not 1 <= self.patch_grid <= self.size:
            raise InputError(f"synthetic_video.patch_grid: expected 1..{self.size}; got {self.patch_grid}")
        bad = [q for q in self.question_types if q not in VIDEO_QUESTION_TYPES]
        if bad or not self.question_types:
            raise InputError(f"synthetic_video.question_types: unknown {bad}; choose from {list(VIDEO_QUESTION_TYPES)}")


@dataclass
class Clip:
    """One generated video: a `Scene` (image and pixel truth) per frame, and its objects."""

    scenes: list[Scene]
    objects: list[dict[str, Any]]


def render_video(spec: SyntheticVideoSpec, index: int) -> Clip:
    """Draw video `index` (independent of the others, so any subset is reproducible)."""
    rng = np.random.default_rng([spec.seed, index, 37])
    S, box = spec.size, int(spec.size * spec.object_size)
    base = np.array([rng.integers(200, 246)] * 3, dtype=np.float64) + rng.integers(-12, 12, 3)
    tex = rng.standard_normal((max(2, S // 8), max(2, S // 8)))
    tex = np.asarray(Image.fromarray(tex.astype(np.float32)).resize((S, S), Image.Resampling.BILINEAR))
    bg = np.clip(base[None, None, :] + spec.texture * 255 * tex[..., None] / 3, 0, 255).astype(np.uint8)
    travel = spec.speed * (spec.frames - 1)
    names = list(COLOURS)
    colours = [names[int(i)] for i in rng.permutation(len(names))[: spec.objects]]
    objects = []
    for col in colours:
        shp = SHAPES[int(rng.integers(len(SHAPES)))]
        still = rng.random() < spec.still_rate or travel == 0
        direction = "still" if still else ("left", "right", "up", "down")[int(rng.integers(4))]
        dx, dy = DIRECTIONS[direction]
        # start where the whole path stays inside the frame
        lo_x, hi_x = max(0, -dx * travel), S - box - max(0, dx * travel)
        lo_y, hi_y = max(0, -dy * travel), S - box - max(0, dy * travel)
        x0, y0 = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
        boxes = [[x0 + dx * spec.speed * f, y0 + dy * spec.speed * f, x0 + dx * spec.speed * f + box - 1, y0 + dy * spec.speed * f + box - 1]
                 for f in range(spec.frames)]
        objects.append({"colour": col, "shape": shp, "direction": direction, "boxes": boxes})
    scenes = []
    for f in range(spec.frames):
        arr = bg.copy()
        kind = np.zeros((S, S), np.int64)
        colour = np.zeros((S, S), np.int64)
        shape = np.zeros((S, S), np.int64)
        for o in objects:  # later objects are drawn over earlier ones, in the image and in the truth
            layer = Image.new("L", (S, S), 0)
            _draw_shape(ImageDraw.Draw(layer), o["shape"], tuple(o["boxes"][f]), 255)
            m = np.asarray(layer) > 127
            arr[m] = COLOURS[o["colour"]]
            kind[m], colour[m], shape[m] = 1, names.index(o["colour"]) + 1, SHAPES.index(o["shape"]) + 1
        scenes.append(Scene(Image.fromarray(arr), kind, colour, shape, np.zeros((S, S), np.int64)))
    return Clip(scenes, objects)


def frame_truth(clip: Clip, patch_grid: int) -> dict[str, list[list[list[Any]]]]:
    """Per-frame, per-patch ground truth: ``{kind, colour, shape}`` -> ``[frames][rows][cols]``."""
    per_frame = [patch_truth(s, patch_grid) for s in clip.scenes]
    return {k: [t[k] for t in per_frame] for k in ("kind", "colour", "shape")}


def video_question(clip: Clip, qtype: str, rng: np.random.Generator) -> tuple[str, str, list[str]] | None:
    """(question, answer, candidates) of one type, or None if the clip cannot answer it unambiguously."""
    objs = clip.objects
    if qtype == "count":
        n = sum(o["direction"] != "still" for o in objs)
        return "how many shapes move?", COUNTS[n], list(COUNTS[: len(objs) + 1])
    o = objs[int(rng.integers(len(objs)))]  # colours are distinct: "the red shape" names one object
    if qtype == "direction":
        return f"which way does the {o['colour']} {o['shape']} move?", o["direction"], list(DIRECTIONS)
    if qtype == "colour":
        if sum(p["shape"] == o["shape"] for p in objs) != 1:
            return None
        return f"what colour is the {o['shape']}?", o["colour"], list(COLOURS)
    raise InputError(f"unknown question type {qtype!r}")


def make_video_records(spec: SyntheticVideoSpec) -> list[Record]:
    """The data set as records (frames rendered in memory), one question per video.

    Each record's meta holds ``qtype``, ``candidates``, ``frame_patch_labels``
    (`frame_truth` at `patch_grid`, one grid per source frame), ``objects``
    (colour, shape, direction, and the box ``[x0, y0, x1, y1]`` in each frame)
    and ``size`` (the frame side the boxes are in).
    """
    spec.check()
    out = []
    for i in range(spec.n):
        clip = render_video(spec, i)
        rng = np.random.default_rng([spec.seed, i, 38])
        types = list(spec.question_types)
        start = i % len(types)
        qa, qtype = None, None
        for t in types[start:] + types[:start]:
            qa = video_question(clip, t, rng)
            if qa is not None:
                qtype = t
                break
        if qa is None:  # only "colour" asked and two objects share a shape: ask for the count instead
            qtype, qa = "count", video_question(clip, "count", rng)
        q, a, cands = qa
        meta = {"qtype": qtype, "candidates": cands, "frame_patch_labels": frame_truth(clip, spec.patch_grid), "objects": clip.objects,
                "size": spec.size}
        out.append(Record([], question=q, answer=a, id=f"vid-{spec.seed}-{i:05d}", meta=meta, where=f"synthetic_video[{i}]",
                          video=[s.image for s in clip.scenes]))
    return out


def save_video(spec: SyntheticVideoSpec, folder: str) -> str:
    """Write the data set as PNG frames plus ``prompts.jsonl`` (one ``video: [frame files]`` per line); returns
    the prompts file, which a plan reads as ``data.prompts``."""
    import json
    from pathlib import Path

    out = Path(folder)
    rows = []
    for rec in make_video_records(spec):
        (out / "frames" / rec.id).mkdir(parents=True, exist_ok=True)
        names = []
        for f, im in enumerate(rec.video):
            names.append(f"frames/{rec.id}/{f:03d}.png")
            im.save(out / names[-1])
        rows.append({"id": rec.id, "video": names, "question": rec.question, "answer": rec.answer, **rec.meta})
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    path = out / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)

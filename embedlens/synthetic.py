"""A synthetic data set with per-patch ground truth: coloured shapes at grid positions, some words.

Every image comes with what lies under each patch of the vision encoder
(background / object / text, and the colour, shape and character there) and
question-answer pairs with candidate answers, so "which visual tokens are
dead" has a known answer. Deterministic by seed.

>>> ds = SyntheticSpec(n=4, seed=0, size=64, patch_grid=8)
>>> rec = make_records(ds)[0]
>>> sample, _ = rec.load()
>>> sample.images[0].size, len(sample.meta["patch_labels"]["kind"])
((64, 64), 8)

Given a model, the ground truth follows its visual-token grid unless
`patch_grid` is set:

>>> import embedlens
>>> adapter = embedlens.load_model("tiny:llava-clip")
>>> samples = SyntheticSpec(n=2, size=64).samples(adapter)
>>> len(samples[0].meta["patch_labels"]["kind"]) == adapter.grid()[0]
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from embedlens.data import Record, Sample
from embedlens.errors import InputError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 150, 50),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 45, 175),
    "orange": (240, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
WORDS = ("cat", "dog", "sun", "car", "box", "cup", "sky", "man")
COUNTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION_TYPES = ("colour", "shape", "position", "word", "count")
KINDS = ("background", "object", "text")
#: Ground-truth grid when neither the spec nor a model gives one.
DEFAULT_PATCH_GRID = 8


def position_names(grid: int) -> list[list[str]]:
    """Names of the cells of a `grid` x `grid` layout ("top left", "centre", ...)."""
    if grid == 1:
        return [["centre"]]
    rows = ["top"] + ["middle"] * (grid - 2) + ["bottom"] if grid > 2 else ["top", "bottom"]
    cols = ["left"] + ["centre"] * (grid - 2) + ["right"] if grid > 2 else ["left", "right"]
    if grid > 3:  # keep names unique on larger grids
        rows = [f"row {r}" for r in range(grid)]
        cols = [f"column {c}" for c in range(grid)]
    out = []
    for r in rows:
        line = []
        for c in cols:
            line.append("centre" if (r, c) == ("middle", "centre") else f"{r} {c}")
        out.append(line)
    return out


@dataclass
class SyntheticSpec:
    """Parameters of the synthetic data set.

    Args:
        n: number of images (one question each).
        seed: everything is drawn from this seed.
        size: image side in pixels.
        grid: objects sit in the cells of a `grid` x `grid` layout.
        background: target share of background patches; 0.4 gives about the
            60% alive tokens the study saw on natural images, 0.85 a sparse set.
        texture: amplitude (0..1) of the background's light texture.
        word_rate: share of images with a rendered word (in one free cell).
        patch_grid: ground-truth grid (patches per side). None (the default):
            the model's visual-token grid when `records` / `samples` /
            `make_records` are given a model, else 8; plans say ``auto``.
        question_types: which questions to ask, cycled through the images.
    """

    n: int = 64
    seed: int = 0
    size: int = 64
    grid: int = 3
    background: float = 0.4
    texture: float = 0.08
    word_rate: float = 0.3
    patch_grid: int | None = None
    question_types: tuple[str, ...] = QUESTION_TYPES

    def check(self) -> None:
        """Raises InputError naming the parameter that is out of range."""
        if self.n < 1:
            raise InputError(f"synthetic.n: need at least 1 image; got {self.n}")
        if not 16 <= self.size <= 1024:
            raise InputError(f"synthetic.size: expected 16..1024 pixels; got {self.size}")
        if not 1 <= self.grid <= 6:
            raise InputError(f"synthetic.grid: expected 1..6 cells per side; got {self.grid}")
        if not 0.0 <= self.background < 1.0:
            raise InputError(f"synthetic.background: expected a share in [0, 1); got {self.background}")
        if self.patch_grid is not None and not 1 <= self.patch_grid <= self.size:
            raise InputError(f"synthetic.patch_grid: expected 1..{self.size}; got {self.patch_grid}")
        bad = [q for q in self.question_types if q not in QUESTION_TYPES]
        if bad or not self.question_types:
            raise InputError(f"synthetic.question_types: unknown {bad}; choose from {list(QUESTION_TYPES)}")

    def for_model(self, model: Any = None) -> "SyntheticSpec":
        """This spec with `patch_grid` fixed: as given, else `model`'s visual-token grid, else 8.

        Args:
            model: a loaded `embedlens.Adapter` (or None).
        """
        if self.patch_grid is not None:
            return self
        from dataclasses import replace

        return replace(self, patch_grid=model.grid()[0] if model is not None else DEFAULT_PATCH_GRID)

    def records(self, model: Any = None) -> list[Record]:
        """The data set as records (images rendered in memory); see `make_records`."""
        return make_records(self, model)

    def samples(self, model: Any = None) -> list[Sample]:
        """The data set as samples, ready for `Adapter.encode` or `embedlens.probe`."""
        return [r.load()[0] for r in make_records(self, model)]


@dataclass
class Scene:
    """One generated image with its pixel-level truth."""

    image: Image.Image
    kind: np.ndarray  # [H, W] index into KINDS
    colour: np.ndarray  # [H, W] object colour name index + 1 (0 = none)
    shape: np.ndarray  # [H, W] shape index + 1 (0 = none)
    char: np.ndarray  # [H, W] character code (0 = none)
    objects: list[dict[str, Any]] = field(default_factory=list)
    word: str | None = None
    word_cell: tuple[int, int] | None = None


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError, ImportError):  # bitmap fallback without FreeType
        return ImageFont.load_default()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        w, h = x1 - x0, y1 - y0
        draw.rectangle((x0 + w * 0.33, y0, x1 - w * 0.33, y1), fill=fill)
        draw.rectangle((x0, y0 + h * 0.33, x1, y1 - h * 0.33), fill=fill)


def render(spec: SyntheticSpec, index: int) -> Scene:
    """Draw image `index` of the data set (independent of the others, so any subset is reproducible)."""
    rng = np.random.default_rng([spec.seed, index])
    S, G = spec.size, spec.grid
    base = np.array([rng.integers(200, 246)] * 3, dtype=np.float64) + rng.integers(-12, 12, 3)
    tex = rng.standard_normal((max(2, S // 8), max(2, S // 8)))
    tex = np.asarray(Image.fromarray(tex.astype(np.float32)).resize((S, S), Image.Resampling.BILINEAR))
    bg = np.clip(base[None, None, :] + spec.texture * 255 * tex[..., None] / 3, 0, 255).astype(np.uint8)
    image = Image.fromarray(bg)
    kind = np.zeros((S, S), np.int64)
    colour = np.zeros((S, S), np.int64)
    shape = np.zeros((S, S), np.int64)
    char = np.zeros((S, S), np.int64)
    cells = [(r, c) for r in range(G) for c in range(G)]
    cell = S / G
    has_word = rng.random() < spec.word_rate
    # Objects needed for the target background share: a shape fills about 0.6 of its box (measured), the box 0.85^2 of its cell.
    per_object = 0.6 * 0.85**2 / (G * G)
    target = (1.0 - spec.background) - (0.25 / (G * G) if has_word else 0.0)
    k = int(np.clip(np.round(target / per_object + rng.uniform(-0.5, 0.5)), 1, G * G - (1 if has_word else 0)))
    # then grow or shrink the boxes so k objects cover the target
    scale = float(np.clip(np.sqrt(max(target, 0.0) / (0.75 * k / (G * G))), 0.55, 0.98))
    order = rng.permutation(len(cells))
    names = list(COLOURS)
    positions = position_names(G)
    objects = []
    for j in order[:k]:
        r, c = cells[j]
        col = names[int(rng.integers(len(names)))]
        shp = SHAPES[int(rng.integers(len(SHAPES)))]
        margin = cell * (1 - scale) / 2
        box = (int(c * cell + margin), int(r * cell + margin), int((c + 1) * cell - margin) - 1, int((r + 1) * cell - margin) - 1)
        layer = Image.new("L", (S, S), 0)
        _draw_shape(ImageDraw.Draw(layer), shp, box, 255)
        m = np.asarray(layer) > 127
        arr = np.asarray(image).copy()
        arr[m] = COLOURS[col]
        image = Image.fromarray(arr)
        kind[m], colour[m], shape[m] = 1, names.index(col) + 1, SHAPES.index(shp) + 1
        objects.append({"colour": col, "shape": shp, "row": r, "col": c, "position": positions[r][c]})
    word, word_cell = None, None
    if has_word:
        free = [cells[j] for j in order[k:]]
        r, c = free[int(rng.integers(len(free)))]
        word = WORDS[int(rng.integers(len(WORDS)))]
        font = _font(max(8, int(cell * 0.5)))
        draw = ImageDraw.Draw(image)
        total = sum(font.getlength(ch) for ch in word)
        x = c * cell + (cell - total) / 2
        top = r * cell + cell * 0.15
        for ch in word:
            adv = font.getlength(ch)
            layer = Image.new("L", (S, S), 0)
            ImageDraw.Draw(layer).text((x, top), ch, font=font, fill=255)
            m = np.asarray(layer) > 100
            draw.text((x, top), ch, font=font, fill=(15, 15, 15))
            # the character owns its advance box (ink is sparse), clipped to the cell
            x0, x1 = int(max(x, c * cell)), int(min(x + adv, (c + 1) * cell))
            y0, y1 = int(top), int(min(top + cell * 0.7, (r + 1) * cell))
            box = np.zeros_like(m)
            box[y0:y1, x0:x1] = True
            cell_mask = np.zeros_like(m)
            cell_mask[int(r * cell) : int((r + 1) * cell), int(c * cell) : int((c + 1) * cell)] = True
            box |= m & cell_mask  # ink outside the word's cell (large fonts) does not claim other cells
            kind[box], char[box] = 2, ord(ch)
            x += adv
        word_cell = (r, c)
    return Scene(image, kind, colour, shape, char, objects, word, word_cell)


def patch_truth(scene: Scene, patch_grid: int) -> dict[str, list[list[Any]]]:
    """Per-patch ground truth by majority over each patch's pixels: kind, colour, shape, char.

    Colour and shape are ``None`` off objects, char ``None`` off text.
    """
    S = scene.kind.shape[0]
    edges = np.linspace(0, S, patch_grid + 1).round().astype(int)
    out: dict[str, list[list[Any]]] = {"kind": [], "colour": [], "shape": [], "char": []}
    names = list(COLOURS)
    for r in range(patch_grid):
        rows = {key: [] for key in out}
        for c in range(patch_grid):
            sl = (slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1]))
            kinds = np.bincount(scene.kind[sl].ravel(), minlength=3)
            k = int(kinds.argmax())
            rows["kind"].append(KINDS[k])
            if k == 1:
                cv = scene.colour[sl][scene.kind[sl] == 1]
                sv = scene.shape[sl][scene.kind[sl] == 1]
                rows["colour"].append(names[int(np.bincount(cv).argmax()) - 1])
                rows["shape"].append(SHAPES[int(np.bincount(sv).argmax()) - 1])
            else:
                rows["colour"].append(None)
                rows["shape"].append(None)
            if k == 2:
                chv = scene.char[sl][scene.kind[sl] == 2]
                rows["char"].append(chr(int(np.bincount(chv).argmax())))
            else:
                rows["char"].append(None)
        for key in out:
            out[key].append(rows[key])
    return out


def question(scene: Scene, qtype: str, rng: np.random.Generator, grid: int) -> tuple[str, str, list[str]] | None:
    """(question, answer, candidates) of one type for a scene, or None if the scene cannot answer it unambiguously."""
    objs = scene.objects
    if qtype == "count":
        n = len(objs)
        return "how many shapes are there?", COUNTS[n] if n < len(COUNTS) else str(n), list(COUNTS[1 : grid * grid + 1])
    if qtype == "word":
        if scene.word is None:
            return None
        return "what word is written?", scene.word, list(WORDS)
    if qtype == "colour":
        unique = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"what colour is the {o['shape']}?", o["colour"], list(COLOURS)
    if qtype == "shape":
        unique = [o for o in objs if sum(p["colour"] == o["colour"] for p in objs) == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"what shape is {o['colour']}?", o["shape"], list(SHAPES)
    if qtype == "position":
        unique = [o for o in objs if sum((p["colour"], p["shape"]) == (o["colour"], o["shape"]) for p in objs) == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"where is the {o['colour']} {o['shape']}?", o["position"], [n for row in position_names(grid) for n in row]
    raise InputError(f"unknown question type {qtype!r}")


def all_questions(spec: SyntheticSpec, index: int, scene: Scene) -> list[tuple[str, str, str, list[str]]]:
    """Every question type image `index` can answer, as (qtype, question, answer, candidates), seeded by (seed, index).

    The zoo trains on these and `embedlens zoo evaluate` asks them of held-out images.
    """
    rng = np.random.default_rng([spec.seed, index, 8])
    out = []
    for qtype in QUESTION_TYPES:
        got = question(scene, qtype, rng, spec.grid)
        if got is not None:
            out.append((qtype, *got))
    return out


def every_question(scene: Scene, grid: int) -> list[tuple[str, str, str, list[str]]]:
    """Every unambiguous question of a scene as (qtype, question, answer, candidates): the colour of each object
    whose shape is unique, the shape of each object whose colour is unique, the position of each object whose
    colour and shape are unique together, the count, and the word if one is written. Object order: reading order.

    The zoo trains on these (all of an image's questions as turns of one conversation); `all_questions` draws
    one of each type, which is what the held-out evaluation asks.
    """
    objs = sorted(scene.objects, key=lambda o: (o["row"], o["col"]))
    positions = [n for row in position_names(grid) for n in row]
    out = [("count", *question(scene, "count", np.random.default_rng(0), grid))]
    if scene.word is not None:
        out.append(("word", "what word is written?", scene.word, list(WORDS)))
    for o in objs:
        if sum(p["shape"] == o["shape"] for p in objs) == 1:
            out.append(("colour", f"what colour is the {o['shape']}?", o["colour"], list(COLOURS)))
        if sum(p["colour"] == o["colour"] for p in objs) == 1:
            out.append(("shape", f"what shape is {o['colour']}?", o["shape"], list(SHAPES)))
        if sum((p["colour"], p["shape"]) == (o["colour"], o["shape"]) for p in objs) == 1:
            out.append(("position", f"where is the {o['colour']} {o['shape']}?", o["position"], positions))
    return out


def make_records(spec: SyntheticSpec, model: Any = None) -> list[Record]:
    """The data set as records (images rendered in memory), one question per image.

    With `model` (a loaded adapter) and no `patch_grid`, the ground truth is
    at the model's visual-token grid (`SyntheticSpec.for_model`).

    Question types cycle through `spec.question_types`; when an image cannot
    answer the type due (no word, no unique shape), the next type is asked.
    Each record's meta holds ``qtype``, ``candidates``, ``patch_labels``
    (kind / colour / shape / char grids at `patch_grid`), ``objects`` and ``word``.
    """
    spec = spec.for_model(model)
    spec.check()
    out = []
    for i in range(spec.n):
        scene = render(spec, i)
        rng = np.random.default_rng([spec.seed, i, 1])
        types = list(spec.question_types)
        start = i % len(types)
        qa, qtype = None, None
        for t in types[start:] + types[:start]:
            qa = question(scene, t, rng, spec.grid)
            if qa is not None:
                qtype = t
                break
        if qa is None:  # e.g. only "word" asked and no word drawn: ask for the count instead
            qtype, qa = "count", question(scene, "count", rng, spec.grid)
        q, a, cands = qa
        meta = {
            "qtype": qtype,
            "candidates": cands,
            "patch_labels": patch_truth(scene, spec.patch_grid),
            "objects": scene.objects,
            "word": scene.word,
        }
        out.append(Record([scene.image], question=q, answer=a, id=f"syn-{spec.seed}-{i:05d}", meta=meta, where=f"synthetic[{i}]"))
    return out


def background_share(records: list[Record]) -> float:
    """Measured share of background patches over the records' ground truth."""
    kinds = [k for r in records for row in r.meta["patch_labels"]["kind"] for k in row]
    return sum(k == "background" for k in kinds) / max(1, len(kinds))


def save(spec: SyntheticSpec, folder: str, fmt: str = "jsonl") -> str:
    """Write the data set as PNG files plus ``prompts.jsonl`` (or ``.csv``); returns the prompts file."""
    import csv
    import json
    from pathlib import Path

    spec = spec.for_model(None)  # spec.json records the grid the labels were made at
    out = Path(folder)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for rec in make_records(spec):
        name = f"images/{rec.id}.png"
        rec.images[0].save(out / name)
        rows.append({"id": rec.id, "image": name, "question": rec.question, "answer": rec.answer, **rec.meta})
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    if fmt == "csv":
        path = out / "prompts.csv"
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["id", "image", "question", "answer", "qtype", "candidates", "patch_labels"])
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(r[k]) if isinstance(r[k], (list, dict)) else r[k] for k in w.fieldnames})
        return str(path)
    path = out / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)

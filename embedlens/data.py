"""Samples (images or a video + prompt text) and reading them from disk with clear errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from embedlens.errors import InputError
from embedlens.images import DEFAULT_MAX_PIXELS, MAX_ASPECT, REFUSE_FACTOR, load_image, open_image  # noqa: F401 (public names here)
from embedlens.video import Video, VideoOptions, read_video_file, resolve_inside


@dataclass
class Sample:
    """One prompt with its images, or with a video.

    Give either `question` (wrapped in the model family's chat template, images
    first) or a full `prompt` containing one image placeholder per image.
    `answer`, when given, is appended and marked as the answer span.

    `video` is a `embedlens.video.Video` or its frames as a list of images in
    time order (all one size), taken as they are; a sample has images or a
    video, not both.

    >>> from PIL import Image
    >>> s = Sample(video=[Image.new("RGB", (28, 28)) for _ in range(4)], question="what moves?")
    >>> len(s.video), s.images
    (4, [])
    """

    images: list[Image.Image] = field(default_factory=list)
    question: str | None = None
    prompt: str | None = None
    answer: str | None = None
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    video: Video | None = None

    def __post_init__(self) -> None:
        if self.video is not None and not isinstance(self.video, Video):
            frames = list(self.video) if isinstance(self.video, (list, tuple)) else None
            if not frames or not all(isinstance(f, Image.Image) for f in frames):
                raise InputError(f"sample {self.id!r}: video must be a Video or a non-empty list of PIL images; got {type(self.video).__name__}")
            self.video = Video([f if f.mode == "RGB" else f.convert("RGB") for f in frames], source=f"sample {self.id!r}")
        if self.video is not None and self.images:
            raise InputError(f"sample {self.id!r}: has {len(self.images)} image(s) and a video; give one or the other")


@dataclass
class Record:
    """One sample before its images are decoded: what a data source lists.

    `images` holds paths or in-memory images; `video` a video file's path or
    a list of frame paths; `where` says where the record came from
    (``file:line``) for error messages. `load` decodes the images or the
    video and returns the `Sample`; a bad file is an error for that sample only.
    """

    images: list[Any]
    question: str | None = None
    prompt: str | None = None
    answer: str | None = None
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    video: Any = None

    def load(self, max_pixels: int | None = DEFAULT_MAX_PIXELS, video: VideoOptions | None = None) -> tuple[Sample, list[str]]:
        """Decode the images, or the frames of the video that `video` keeps.

        Returns:
            (sample, notes): the conversions applied, one note per converted image.

        Raises:
            InputError: naming the record and the image or video.
        """
        if self.video is not None:
            try:
                if isinstance(self.video, (list, tuple)):
                    v = Video.from_frames(list(self.video), video, source=f"{self.where} 'video'")
                else:
                    v = read_video_file(self.video, video)
            except InputError as e:
                raise InputError(f"{self.where}: {e}") from None
            return Sample([], self.question, self.prompt, self.answer, self.id, dict(self.meta), v), []
        images, notes = [], []
        for i, src in enumerate(self.images):
            try:
                im, n = open_image(src, max_pixels)
            except InputError as e:
                raise InputError(f"{self.where}: {e}") from None
            images.append(im)
            notes += [f"image {i}: {x}" for x in n]
        meta = dict(self.meta)
        if "regions" in meta and "patch_labels" not in meta:
            meta["patch_labels"] = regions_to_grids(meta["regions"], images[0].size, where=self.where)
        return Sample(images, self.question, self.prompt, self.answer, self.id, meta), notes


def regions_to_grids(regions: Any, size: tuple[int, int], cells: int = 32, where: str = "") -> dict[str, list[list[Any]]]:
    """Rasterise per-region annotations into per-attribute grids (`meta.patch_labels`).

    `regions` is a list of ``{"box": [x0, y0, x1, y1], "labels": {attribute: value}}``
    in pixels of the (first) image; later regions are drawn over earlier ones;
    cells no region covers are ``None``. Grids are `cells` x `cells`; probes
    read them at their own patch resolution (`semantic_probe.patch_label`).

    >>> regions_to_grids([{"box": [0, 0, 32, 64], "labels": {"colour": "red"}}], (64, 64), cells=2)
    {'colour': [['red', None], ['red', None]]}
    """
    if not isinstance(regions, list):
        raise InputError(f"{where}: 'regions' must be a list of {{box: [x0, y0, x1, y1], labels: {{...}}}}")
    w, h = size
    grids: dict[str, list[list[Any]]] = {}
    for j, reg in enumerate(regions):
        box = reg.get("box") if isinstance(reg, dict) else None
        labels = reg.get("labels") if isinstance(reg, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)) or not isinstance(labels, dict):
            raise InputError(f"{where}: regions[{j}] needs 'box': [x0, y0, x1, y1] (pixels) and 'labels': {{attribute: value}}; got {reg!r}")
        x0, y0, x1, y1 = box
        for attr, value in labels.items():
            g = grids.setdefault(attr, [[None] * cells for _ in range(cells)])
            for r in range(cells):
                cy = (r + 0.5) * h / cells
                if not y0 <= cy < y1:
                    continue
                for c in range(cells):
                    if x0 <= (c + 0.5) * w / cells < x1:
                        g[r][c] = value
    return grids


_JSON_COLUMNS = ("candidates", "patch_labels", "regions", "images", "video")


def _video_record(rec: dict, where: str, root: Path) -> Any:
    """The `video` key of a record: one path (a video file) or a list of frame image paths, each a file inside
    the data folder (`resolve_inside`)."""
    v = rec.pop("video")
    if any(rec.get(k) not in (None, "", []) for k in ("image", "images")):
        raise InputError(f"{where}: give 'video' or 'image'/'images', not both")
    rec.pop("image", None), rec.pop("images", None)
    if isinstance(v, str):
        return resolve_inside(root, v, where, "video")
    if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        return [resolve_inside(root, p, where, f"video[{i}]") for i, p in enumerate(v)]
    raise InputError(f"{where}: 'video' must be a video file path or a non-empty list of frame image paths; got {v!r}")


def _record(rec: dict, where: str, root: Path) -> Record:
    video = _video_record(rec, where, root) if rec.get("video") not in (None, "") else None
    rec.pop("video", None)
    paths = rec.pop("images", None) or ([rec.pop("image")] if rec.get("image") not in (None, "") else None)
    rec.pop("image", None)
    if not paths and video is None:
        raise InputError(f"{where}: needs 'image' (a path), 'images' (a list of paths) or 'video' (a video file or a list of frame paths)")
    paths = paths or []
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise InputError(f"{where}: 'images' must be a list of paths; got {paths!r}")
    has_q, has_p = rec.get("question") not in (None, ""), rec.get("prompt") not in (None, "")
    if has_q == has_p:
        raise InputError(f"{where}: give exactly one of 'question' or 'prompt'")
    if "candidates" in rec and not (isinstance(rec["candidates"], list) and all(isinstance(c, str) for c in rec["candidates"])):
        raise InputError(f"{where}: 'candidates' must be a list of strings; got {rec['candidates']!r}")
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        raise InputError(f"{where}: image file not found: {root / missing[0]}")
    question, prompt = rec.pop("question", None) or None, rec.pop("prompt", None) or None
    answer = rec.pop("answer", None)
    rid = rec.pop("id", None)
    return Record([root / p for p in paths], question, prompt, answer if answer not in ("",) else None, str(rid) if rid not in (None, "") else "", rec, where, video)


def read_records(path: str | Path, image_root: str | Path | None = None) -> list[Record]:
    """List the samples of a JSONL or CSV file without decoding images.

    JSONL: one object per line. CSV: a header row; list-valued columns
    (``candidates``, ``patch_labels``, ``regions``) hold JSON, ``images``
    holds paths separated by ``;`` (so does ``video``, for a list of frames).
    Keys: ``image`` (a path) or ``images``, or ``video`` (a video file, or a
    list of frame image files in time order, each inside the data folder),
    ``question`` or ``prompt``; optional ``answer``, ``id``, ``candidates``
    (candidate answers), ``patch_labels`` (per-patch annotation grids),
    ``regions`` (boxes with labels); other keys go to `Sample.meta`. Image
    paths are relative to `image_root` or the file's folder; that each image
    exists is checked here, decoding happens per batch (`Record.load`).

    Raises:
        InputError: naming the file and line of a bad record, or an empty file.
    """
    import csv

    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    records: list[Record] = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte offset {e.start}); save the file as UTF-8") from None
    if path.suffix.lower() == ".csv":
        import io

        with io.StringIO(text, newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                rec: dict[str, Any] = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
                if None in row:
                    raise InputError(f"{where}: more fields than the header has columns")
                for k in _JSON_COLUMNS:
                    if k in rec:
                        if k == "images" and not rec[k].lstrip().startswith("["):
                            rec[k] = [p.strip() for p in rec[k].split(";") if p.strip()]
                            continue
                        if k == "video" and not rec[k].lstrip().startswith("["):
                            parts = [p.strip() for p in rec[k].split(";") if p.strip()]
                            rec[k] = parts if len(parts) > 1 else rec[k].strip()
                            continue
                        try:
                            rec[k] = json.loads(rec[k])
                        except json.JSONDecodeError as e:
                            raise InputError(f"{where}: column {k!r} must hold JSON ({e.msg}); got {rec[k]!r}") from None
                        except RecursionError:
                            raise InputError(f"{where}: column {k!r}: the JSON is nested too deeply") from None
                records.append(_record(rec, where, root))
                if not records[-1].id:
                    records[-1].id = f"{path.stem}-{reader.line_num}"
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise InputError(f"{where}: the JSON is nested too deeply") from None
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            records.append(_record(rec, where, root))
            if not records[-1].id:
                records[-1].id = f"{path.stem}-{lineno}"
    if not records:
        raise InputError(f"{path}: no samples")
    return _unique_ids(records)


def _unique_ids(records: list[Record]) -> list[Record]:
    """`records`, once no two share an id: results are paired and joined by sample id (conditions against the
    baseline, tables against the data)."""
    seen: dict[str, str] = {}
    for r in records:
        if r.id in seen:
            raise InputError(f"{r.where}: duplicate sample id {r.id!r} (first at {seen[r.id]})")
        seen[r.id] = r.where
    return records


def read_jsonl(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Read and decode every sample of a JSONL or CSV file (see `read_records`).

    Raises:
        InputError: naming the file and line of a bad record or image.
    """
    return [r.load()[0] for r in read_records(path, image_root)]


def read_hf_dataset(
    path: str | Path,
    split: str | None = None,
    columns: dict[str, str] | None = None,
) -> list[Record]:
    """List the samples of a Hugging Face `datasets` data set stored locally.

    `path` is a folder written by ``Dataset.save_to_disk`` (or a
    ``DatasetDict``'s, then `split` picks one), or a folder ``load_dataset``
    reads (data files, e.g. Parquet/JSON/CSV or an image folder). `columns`
    maps the fields embedlens uses (``image``, ``question``, ``prompt``,
    ``answer``, ``candidates``, ``id``, ``patch_labels``, ``regions``,
    ``video``) to the data set's column names; unmapped columns go to `meta`.
    A ``video`` column holds a video file's path or a list of frame image
    paths, relative to `path` and inside it.

    Raises:
        InputError: naming the path, split or column that is wrong.
    """
    try:
        import datasets
    except ImportError:
        raise InputError("reading a Hugging Face data set needs the 'datasets' package: pip install datasets") from None
    path = Path(path)
    if not path.exists():
        raise InputError(f"data set folder not found: {path}")
    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path))
    except Exception as e:  # datasets raises many types for a bad folder
        raise InputError(f"cannot read data set {path}: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise InputError(f"data set {path} has splits {sorted(ds)}; choose one with data.split")
            split = next(iter(ds))
        if split not in ds:
            raise InputError(f"data set {path} has no split {split!r}; splits: {sorted(ds)}")
        ds = ds[split]
    names = {"image": "image", "question": "question", "prompt": "prompt", "answer": "answer", "candidates": "candidates", "id": "id", "video": "video"}
    names.update(columns or {})
    has_video = names["video"] in ds.column_names
    if "video" in (columns or {}) and not has_video:
        raise InputError(f"data set {path}: data.columns.video names {names['video']!r}, not a column; columns: {ds.column_names}")
    if names["image"] not in ds.column_names and "images" not in ds.column_names and not has_video:
        raise InputError(f"data set {path} has no image column {names['image']!r}; columns: {ds.column_names} (map it with data.columns.image)")
    ds, image_columns = _undecoded(ds, datasets)
    for field_ in ("question", "prompt", "answer", "candidates", "id"):
        if field_ in (columns or {}) and names[field_] not in ds.column_names:
            raise InputError(f"data set {path}: data.columns.{field_} names {names[field_]!r}, not a column; columns: {ds.column_names}")
    records = []
    used = set(names.values())
    for i, row in enumerate(ds):
        where = f"{path}[{i}]"
        video = row.get(names["video"]) if has_video else None
        if video not in (None, "", []):
            video = _video_record({"video": video, "image": row.get(names["image"]), "images": row.get("images")}, where, path)
            img = []
        else:
            video = None
            img = row.get(names["image"], row.get("images"))
        imgs = img if isinstance(img, list) else [img]
        resolved = []
        for im in imgs:
            if isinstance(im, str):
                p = Path(im) if Path(im).is_absolute() else path / im
                resolved.append(p)
            elif isinstance(im, Image.Image):
                resolved.append(im)
            elif isinstance(im, dict) and im.get("bytes"):
                import io

                resolved.append(io.BytesIO(im["bytes"]))
            elif isinstance(im, dict) and isinstance(im.get("path"), str) and im["path"]:  # an image folder's file, by path
                p = Path(im["path"])
                resolved.append(p if p.is_absolute() else path / p)
            else:
                raise InputError(f"{where}: column {names['image']!r} holds {type(im).__name__}, expected an image or a path")
        q, pr = row.get(names["question"]), row.get(names["prompt"])
        if (q not in (None, "")) == (pr not in (None, "")):
            raise InputError(f"{where}: needs exactly one of a question (column {names['question']!r}) or a prompt (column {names['prompt']!r})")
        meta = {k: v for k, v in row.items() if k not in used and k != "images" and k not in image_columns and not isinstance(v, Image.Image)}
        if row.get(names["candidates"]) is not None:
            meta["candidates"] = list(row[names["candidates"]])
        rid = row.get(names["id"])
        records.append(
            Record(resolved, q or None, pr or None, row.get(names["answer"]) or None, str(rid) if rid is not None else f"{path.name}-{i}", meta, where, video)
        )
    if not records:
        raise InputError(f"data set {path} has no rows")
    return _unique_ids(records)


def _undecoded(ds: Any, datasets: Any) -> tuple[Any, set[str]]:
    """The data set with its image columns left encoded (``{bytes, path}``), and those columns' names.

    `datasets` decodes an ``Image`` column on every row read, with Pillow's own
    size check only: a 225-megapixel image raises ``DecompressionBombError``
    from the row loop. Left encoded, each image goes through `open_image`,
    whose header check refuses it for its sample alone, as for a prompts file.
    """
    image_columns = set()
    for col, feat in ds.features.items():
        inner = getattr(feat, "feature", None)  # List(Image()) / Sequence(Image())
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(inner, datasets.Image):
            ds = ds.cast_column(col, type(feat)(datasets.Image(decode=False)))
        else:
            continue
        image_columns.add(col)
    return ds, image_columns

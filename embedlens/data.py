"""Samples (images + prompt text) and reading them from disk with clear errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from embedlens.errors import InputError


@dataclass
class Sample:
    """One prompt with its images.

    Give either `question` (wrapped in the model family's chat template, images
    first) or a full `prompt` containing one image placeholder per image.
    `answer`, when given, is appended and marked as the answer span.
    """

    images: list[Image.Image]
    question: str | None = None
    prompt: str | None = None
    answer: str | None = None
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB.

    Grayscale, palette, RGBA and 16-bit images are converted (RGBA is
    composited on white, so transparent areas do not turn black).

    Raises:
        InputError: the file is missing or is not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                return canvas
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit integer images: scale to 8 bit instead of clipping.
                import numpy as np

                arr = np.asarray(im, dtype=np.float64)
                hi = arr.max() or 1.0
                return Image.fromarray((arr / hi * 255).astype("uint8")).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def read_jsonl(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Read samples from a JSONL file.

    Each line is an object with ``image`` (a path, or ``images``: a list of
    paths, relative to `image_root` or the file's folder), and ``question`` or
    ``prompt``; optional ``answer`` and ``id``; other keys go to `meta`.

    Raises:
        InputError: naming the file and line of a bad record.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    samples = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        paths = rec.pop("images", None) or ([rec.pop("image")] if "image" in rec else None)
        if not paths:
            raise InputError(f"{where}: needs 'image' (a path) or 'images' (a list of paths)")
        if ("question" in rec) == ("prompt" in rec):
            raise InputError(f"{where}: give exactly one of 'question' or 'prompt'")
        images = []
        for p in paths:
            try:
                images.append(load_image(root / p))
            except InputError as e:
                raise InputError(f"{where}: {e}") from None
        samples.append(
            Sample(
                images=images,
                question=rec.pop("question", None),
                prompt=rec.pop("prompt", None),
                answer=rec.pop("answer", None),
                id=str(rec.pop("id", f"{path.stem}-{lineno}")),
                meta=rec,
            )
        )
    if not samples:
        raise InputError(f"{path}: no samples")
    return samples

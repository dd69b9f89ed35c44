"""Llama 4's image processor on PIL and NumPy: HF's `Llama4ImageProcessor` runs on torchvision only.

The rule is HF's (``transformers/models/llama4/image_processing_llama4.py``), step for step: among the canvases of
at most ``max_patches`` square tiles of ``size`` (`supported_canvases`), the one that needs the least downscaling,
or (when the image fits several) the smallest upscaling (`best_canvas`); unless ``resize_to_max_canvas``, an image
is never enlarged beyond one tile's side (`resized_size`). The image is resized keeping its aspect ratio, padded
with zeros at the bottom and right up to the canvas, rescaled and normalised *in bfloat16* (as HF's processor
does: its values are bfloat16's), and cut into tiles, row-major; when there is more than one tile, the whole image
resized to one tile (its aspect ratio not kept) follows them as the global tile. ``pixel_values`` is
``[tiles, 3, size, size]`` over the batch's images, float32 holding those bfloat16 values; ``aspect_ratios``
``[images, 2]`` is each image's (rows, cols) of tiles.

Resizing is PIL's bilinear filter on the 8-bit image (HF's PIL backends'), where HF's fast processor uses
torchvision's antialiased bilinear: an image resized may differ from HF's by a unit of the 8-bit scale on some
pixels; an image whose canvas needs no resize (each side already at most the canvas and the tile side) is
pixel for pixel HF's.

Example:
    >>> from embedlens.adapters.llama4_tiles import best_canvas, supported_canvases
    >>> sorted(supported_canvases(4, 8))
    [(8, 8), (8, 16), (8, 24), (8, 32), (16, 8), (16, 16), (24, 8), (32, 8)]
    >>> best_canvas((12, 30), supported_canvases(4, 8), resize_to_max_canvas=False)  # 8 x 24 and 8 x 32 tie: the smaller
    (8, 24)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs


def supported_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) in pixels of every grid of at most `max_tiles` tiles of `tile` px (HF's
    ``find_supported_resolutions``: by aspect ratio, larger tile counts first)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [(r * tile, c * tile) for grids in by_ratio.values() for r, c in grids]


def best_canvas(image: tuple[int, int], canvases: list[tuple[int, int]], resize_to_max_canvas: bool) -> tuple[int, int]:
    """The canvas an image of `image` (height, width) px goes to (HF's ``get_best_fit``): each canvas's scale is its
    limiting side's; the smallest scale >= 1 (the largest with `resize_to_max_canvas`), else the largest below 1;
    among canvases of that scale, the one of least area."""
    h, w = image
    sizes = torch.tensor(canvases)
    scale_w, scale_h = sizes[:, 1] / w, sizes[:, 0] / h
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)  # float32, as HF's: ties are decided in that precision
    up = scales[scales >= 1]
    if len(up):
        chosen = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    candidates = sizes[scales == chosen]
    best = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(best[0]), int(best[1])


def resized_size(image: tuple[int, int], canvas: tuple[int, int], tile: int, resize_to_max_canvas: bool) -> tuple[int, int]:
    """(height, width) the image is resized to before padding: the largest size within the canvas (within each
    side's own length or one tile, whichever is larger, unless `resize_to_max_canvas`) that keeps its aspect ratio
    (HF's ``get_max_res_without_distortion``), at least 1 px a side."""
    h, w = image
    th, tw = canvas
    if not resize_to_max_canvas:
        th, tw = min(max(h, tile), th), min(max(w, tile), tw)
    if tw / w < th / h:
        new = (min(math.floor(h * (tw / w)), th), tw)
    else:
        new = (th, min(math.floor(w * (th / h)), tw))
    return max(new[0], 1), max(new[1], 1)


def normalize_bf16(image: np.ndarray, factor: float, mean: list[float], std: list[float]) -> torch.Tensor:
    """`[3, H, W]` uint8 -> float32 holding HF's bfloat16 values: ``(x * factor - mean) / std``, each step rounded
    to bfloat16 (HF's ``Llama4ImageProcessor.rescale_and_normalize``)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(torch.bfloat16) * factor
    m = torch.tensor(mean, dtype=torch.bfloat16)[:, None, None]
    s = torch.tensor(std, dtype=torch.bfloat16)[:, None, None]
    return ((x - m) / s).float()


class Llama4ImagesKwargs(ImagesKwargs, total=False):
    """``max_patches``: tiles at most (the global tile aside); ``resize_to_max_canvas``: enlarge to the largest
    canvas that fits, not the smallest."""

    max_patches: int
    resize_to_max_canvas: bool


class Llama4ImageProcessorPil(PilBackend):
    """HF's `Llama4ImageProcessor` on PIL (see the module docstring); saved, it is a ``Llama4ImageProcessor``."""

    resample = PILImageResampling.BILINEAR
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 336, "width": 336}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    max_patches = 16
    resize_to_max_canvas = False
    valid_kwargs = Llama4ImagesKwargs
    model_input_names = ["pixel_values"]

    def _preprocess(self, images: list[np.ndarray], do_resize: bool, size: SizeDict, resample, do_rescale: bool,
                    rescale_factor: float, do_normalize: bool, image_mean, image_std, return_tensors=None,
                    max_patches: int = 16, resize_to_max_canvas: bool = False, **kwargs) -> BatchFeature:
        if not (do_resize and do_rescale and do_normalize):
            raise ValueError("Llama4ImageProcessorPil: do_resize, do_rescale and do_normalize must stay True (the model's "
                             f"tiles are resized, rescaled and normalised); got {do_resize}, {do_rescale}, {do_normalize}")
        if size.height != size.width:
            raise ValueError(f"Llama4ImageProcessorPil: size must be square (one tile); got {size.height} x {size.width}")
        tile = int(size.height)
        canvases = supported_canvases(int(max_patches), tile)
        pixels, ratios = [], []
        for image in images:
            h, w = image.shape[-2:]
            canvas = best_canvas((h, w), canvases, resize_to_max_canvas)
            nh, nw = resized_size((h, w), canvas, tile, resize_to_max_canvas)
            resized = self.resize(image, SizeDict(height=nh, width=nw), resample=resample)
            padded = np.pad(resized, ((0, 0), (0, canvas[0] - nh), (0, canvas[1] - nw)))
            x = normalize_bf16(padded, rescale_factor, image_mean, image_std)
            rows, cols = canvas[0] // tile, canvas[1] // tile
            tiles = x.reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
            if rows * cols > 1:
                whole = normalize_bf16(self.resize(image, size, resample=resample), rescale_factor, image_mean, image_std)
                tiles = torch.cat([tiles, whole[None]])
            pixels.append(tiles)
            ratios.append((rows, cols))
        if return_tensors:
            return BatchFeature({"pixel_values": torch.cat(pixels), "aspect_ratios": torch.tensor(ratios)}, tensor_type=return_tensors)
        return BatchFeature({"pixel_values": pixels, "aspect_ratios": [torch.tensor(r) for r in ratios]})

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Tiles of an image of `height` x `width` px, the global tile included (as HF's)."""
        kw = {"max_patches": self.max_patches, "resize_to_max_canvas": self.resize_to_max_canvas, **(images_kwargs or {})}
        tile = int(self.size["height"])
        rows, cols = (s // tile for s in best_canvas((height, width), supported_canvases(int(kw["max_patches"]), tile),
                                                     bool(kw["resize_to_max_canvas"])))
        return rows * cols + 1 if rows * cols > 1 else 1

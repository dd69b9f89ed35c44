"""Molmo2's image processor without torchvision: HF's `Molmo2ImageProcessor` is a torchvision backend only.

The rule is HF's (``transformers/models/molmo2/image_processing_molmo2.py``), step for step, and its geometry is
HF's own functions (``compute_crop_geometry``, ``arange_for_pooling``, ``batch_pixels_to_patches``: plain torch):

- the high-resolution view: the tiling ``(th, tw)`` of at most ``max_crops`` crops that needs the least scaling
  (`compute_crop_geometry`), the image resized to the canvas ``th * window + margins`` (``window`` the crop side
  less the two ``overlap_margins``, in pixels), and cut into ``th x tw`` square crops of ``size`` that overlap by
  the margins, row-major;
- the low-resolution view: the whole image resized to one crop, put *first*;
- ``pixel_values`` ``[crops, patches, patch_size**2 * 3]``: each crop's patches row-major, each patch's pixels
  row-major with the channels last;
- ``image_token_pooling`` ``[tokens, pool_h * pool_w]``: for each image token, the patches its pooling attends
  to, as indices into the image's crops' patches laid one crop after another (``-1``: none). The low-resolution
  view's tokens come first, then the high-resolution ones; a high-resolution token pools a ``pool_h x pool_w``
  block of the canvas's patch grid, where each crop contributes its patches inside the margins (the first crop of
  a row or column keeps its leading margin, the last its trailing one): a block that straddles the seam between two
  crops pools patches of both;
- ``image_grids`` ``[images, 4]``: (low-res rows, cols, high-res rows, cols) of tokens; ``image_num_crops``.

Resizing: HF resizes the 8-bit image as float with torchvision's bilinear ``resize(antialias=False)``, which for a
float tensor is ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)``; it then
rounds and clamps to 8 bits, and normalises fused (``(x - 255 * mean) / (255 * std)`` in float32, HF's
``_fuse_mean_std_and_rescale_factor``). This module does exactly that, so its pixels are HF's.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> from embedlens.adapters.molmo2_crops import Molmo2ImageProcessorNoTorchvision
    >>> ip = Molmo2ImageProcessorNoTorchvision(size={"height": 28, "width": 28}, patch_size=4, max_crops=4,
    ...                                        overlap_margins=[1, 1], pooling_size=[2, 2])
    >>> out = ip([Image.fromarray(np.zeros((40, 70, 3), np.uint8))], return_tensors="pt")
    >>> out["image_grids"].tolist(), out["image_num_crops"].tolist(), tuple(out["pixel_values"].shape)
    ([[4, 4, 6, 6]], [5], (5, 49, 48))
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling, SizeDict
from transformers.models.molmo2.image_processing_molmo2 import (
    Molmo2ImageProcessorKwargs,
    arange_for_pooling,
    batch_pixels_to_patches,
    compute_crop_geometry,
)

__all__ = ["Molmo2ImageProcessorNoTorchvision", "resize_normalize"]


def resize_normalize(image: torch.Tensor, height: int, width: int, factor: float, mean, std) -> torch.Tensor:
    """`[3, H, W]` uint8 -> `[3, height, width]` float32 as HF's ``resize_and_normalize_image``: bilinear resize of
    the float image (torchvision's ``resize`` without antialias on a float tensor), rounded and clamped to 8 bits,
    then ``(x - mean / factor) / (std / factor)``."""
    x = torch.nn.functional.interpolate(image.float()[None], size=(height, width), mode="bilinear",
                                        align_corners=False, antialias=False)[0]
    x = x.round().clamp(0, 255).to(torch.uint8).float()
    m = torch.tensor(mean) * (1.0 / factor)  # float32, as HF fuses them
    s = torch.tensor(std) * (1.0 / factor)
    return (x - m[:, None, None]) / s[:, None, None]


class Molmo2ImageProcessorNoTorchvision(PilBackend):
    """HF's `Molmo2ImageProcessor` on PIL/NumPy inputs and plain torch (see the module docstring); its settings are
    HF's, so a checkpoint's ``preprocessor_config.json`` builds it."""

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"height": 378, "width": 378}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    max_crops = 8
    overlap_margins = [4, 4]
    patch_size = 14
    pooling_size = [2, 2]
    valid_kwargs = Molmo2ImageProcessorKwargs
    model_input_names = ["pixel_values", "image_token_pooling", "image_grids", "image_num_crops"]

    def _preprocess(self, images: list[np.ndarray], do_resize: bool, size: SizeDict, resample, do_rescale: bool,
                    rescale_factor: float, do_normalize: bool, image_mean, image_std, return_tensors=None,
                    max_crops: int = 8, overlap_margins=(4, 4), patch_size: int = 14, pooling_size=(2, 2),
                    **kwargs) -> BatchFeature:
        if not (do_resize and do_rescale and do_normalize):
            raise ValueError("Molmo2ImageProcessorNoTorchvision: do_resize, do_rescale and do_normalize must stay True "
                             f"(HF's processor always resizes its crops); got {do_resize}, {do_rescale}, {do_normalize}")
        if resample not in (PILImageResampling.BILINEAR, int(PILImageResampling.BILINEAR)):
            raise ValueError(f"Molmo2ImageProcessorNoTorchvision: resample must be BILINEAR (2), as HF's; got {resample!r}")
        if size.height != size.width:
            raise ValueError(f"Molmo2ImageProcessorNoTorchvision: size must be square (one crop); got "
                             f"{size.height} x {size.width}")
        crop, patch = int(size.height), int(patch_size)
        if crop % patch:
            raise ValueError(f"Molmo2ImageProcessorNoTorchvision: size {crop} is not a multiple of patch_size {patch}")
        left, right = (int(m) for m in overlap_margins)
        pool_h, pool_w = (int(p) for p in pooling_size)
        side = crop // patch  # patches a side of one crop
        window = (side - left - right) * patch
        if window <= 0:
            raise ValueError(f"Molmo2ImageProcessorNoTorchvision: overlap_margins {list(overlap_margins)} leave no "
                             f"window in a crop of {side} patches")
        pixels, pooling, grids = [], [], []
        for image in images:
            x = torch.from_numpy(np.ascontiguousarray(image))
            th, tw, ch, cw = compute_crop_geometry(int(x.shape[-2]), int(x.shape[-1]), max_crops=int(max_crops),
                                                   overlap_margins=[left, right], crop_size=crop, patch_size=patch)
            canvas = resize_normalize(x, ch, cw, rescale_factor, image_mean, image_std)
            crops = canvas.unfold(1, crop, window).unfold(2, crop, window)  # [3, th, tw, crop, crop]
            crops = crops.permute(1, 2, 3, 4, 0).reshape(th * tw, crop, crop, 3)
            low = resize_normalize(x, crop, crop, rescale_factor, image_mean, image_std).permute(1, 2, 0)[None]
            # which canvas patch each crop patch is: every crop keeps its patches inside the margins, except that
            # the first (last) crop of a row or column keeps its leading (trailing) margin
            index = torch.arange(th * tw * side * side, dtype=torch.int32).reshape(th, tw, side, side)
            if left:
                index[1:, :, :left, :] = -1
                index[:, 1:, :, :left] = -1
            if right:
                index[:-1, :, -right:, :] = -1
                index[:, :-1, :, -right:] = -1
            index = index.permute(0, 2, 1, 3).reshape(-1)
            high_pool, hr, hc = arange_for_pooling(index[index >= 0].reshape(ch // patch, cw // patch), pool_h, pool_w)
            low_pool, lr, lc = arange_for_pooling(torch.arange(side * side, dtype=torch.int32).reshape(side, side),
                                                  pool_h, pool_w)
            high_pool = torch.where(high_pool >= 0, high_pool + side * side, -1)  # the low-res crop comes first
            pooling.append(torch.cat([low_pool, high_pool]))
            pixels.append(batch_pixels_to_patches(torch.cat([low, crops]), patch))
            grids.append(torch.tensor([lr, lc, hr, hc], dtype=torch.int64))
        data = {"pixel_values": pixels, "image_token_pooling": pooling, "image_grids": grids,
                "image_num_crops": [torch.tensor(len(p), dtype=torch.int64) for p in pixels]}
        if return_tensors:
            data = {"pixel_values": torch.cat(pixels), "image_token_pooling": torch.cat(pooling),
                    "image_grids": torch.stack(grids), "image_num_crops": torch.stack(data["image_num_crops"])}
        return BatchFeature(data, tensor_type=return_tensors)

    def get_image_grid_and_crops(self, height: int, width: int, images_kwargs: dict | None = None) -> tuple[list[int], int]:
        """(low-res rows, cols, high-res rows, cols) of tokens and the crop count (the low-res one included) of an
        image of `height` x `width` px, as HF's `Molmo2ImageProcessor.get_image_grid_and_crops`."""
        kw = {"max_crops": self.max_crops, "overlap_margins": self.overlap_margins, "patch_size": self.patch_size,
              "pooling_size": self.pooling_size, **(images_kwargs or {})}
        crop, patch = int(self.size["height"]), int(kw["patch_size"])
        pool_h, pool_w = (int(p) for p in kw["pooling_size"])
        th, tw, ch, cw = compute_crop_geometry(height, width, max_crops=int(kw["max_crops"]),
                                               overlap_margins=list(kw["overlap_margins"]), crop_size=crop, patch_size=patch)
        up = lambda n, k: -(-n // k)  # noqa: E731 - ceil division
        return [up(crop // patch, pool_h), up(crop // patch, pool_w), up(ch // patch, pool_h), up(cw // patch, pool_w)], th * tw + 1

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Image tokens of an image of `height` x `width` px (low-res and high-res views), as HF's."""
        (lr, lc, hr, hc), _ = self.get_image_grid_and_crops(height, width, images_kwargs)
        return lr * lc + hr * hc

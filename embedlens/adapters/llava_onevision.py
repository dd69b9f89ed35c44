"""LLaVA-OneVision: SigLIP tower, anyres tiling with newline tokens, Qwen2 LLM; video frames pooled 2 x 2
(`embedlens.adapters.llava_onevision_video`)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import BatchFeature, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from embedlens.adapters.base import Adapter
from embedlens.adapters.capabilities import Capability
from embedlens.adapters.llava_onevision_video import OnevisionVideo
from embedlens.registry import adapters


class OnevisionImageProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without its video processor.

    The stock processor will not construct without torchvision (its video
    processor needs it); images alone need only the PIL image processor.
    """

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


@adapters.register("llava_onevision")
class LlavaOnevisionAdapter(OnevisionVideo, Adapter):
    """LLaVA-OneVision: SigLIP tower, anyres tiles with newline tokens, Qwen2 LLM; videos pooled 2 x 2 per frame.

    Images: a base image and an unpadded tile grid with newline tokens. Video frames are pooled 2 x 2, with one
    newline after the last (`embedlens.adapters.llava_onevision_video`)."""

    architectures = ("LlavaOnevisionForConditionalGeneration",)
    model_class = LlavaOnevisionForConditionalGeneration
    vision_towers = ("siglip_vision_model", "clip_vision_model")
    capabilities = frozenset({Capability.VISION_FEATURE_LAYER, Capability.IMAGE_NEWLINE, Capability.VIDEO})

    image_only_processor = OnevisionImageProcessor
    image_only_keys = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "chat_template")

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        """The model's own `pack_image_features` run on patch coordinates (see `anyres_layouts`); in a video
        batch, one layout per video (`OnevisionVideo.video_layouts`)."""
        if "pixel_values_videos" in inputs:
            return self.video_layouts(inputs)
        cfg = self.config
        image_sizes = inputs["image_sizes"]
        batch_num_images = inputs.get("batch_num_images")
        if batch_num_images is None:
            need = [True] * len(image_sizes)
        else:  # as the model: images of a multi-image prompt are not tiled
            need = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        n_tiles = [
            image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size)
            if p else 1
            for s, p in zip(image_sizes, need)
        ]
        return anyres_layouts(self.model.model.pack_image_features, cfg, image_sizes, n_tiles)


def anyres_layouts(
    pack: Callable[..., tuple[list[torch.Tensor], torch.Tensor]],
    config: LlavaOnevisionConfig,
    image_sizes: torch.Tensor,
    n_tiles: Sequence[int],
) -> list[torch.Tensor]:
    """Layouts of anyres images, from the model's packing code run on coordinates instead of features.

    Every tile's features are replaced by (1, global row + 1, global col + 1):
    the patch's coordinates in the whole grid of tiles (tile row * patch rows
    + local row, likewise for columns), the base image by its own patch
    coordinates; the newline vector is zeros. Whatever `pack` does to features
    (unpadding, newline insertion, anyres_max downsampling) it then does to
    the coordinates, so the layout cannot drift from the model's code. A
    downsampled token holds the interpolated coordinates of its sampling point;
    it is assigned the nearest patch of the grid (at an exact tie, the lower /
    right one), and that patch's tile and local coordinates follow by
    division. Interpolating (tile, local row, local col) instead would be
    wrong: they are not linear across tile boundaries.

    Args:
        pack: the model's `pack_image_features(features, image_sizes, image_newline=, vision_aspect_ratio=)`.
        config: the model's `LlavaOnevisionConfig` (tile size, pinpoints, aspect ratio).
        image_sizes: `[images, 2]` (height, width) of each original image.
        n_tiles: tiles of each image, base image included (1: not tiled).

    Returns:
        one `[n_tokens, 5]` long tensor per image: (tile, row, col, feature_row,
        feature_col), as `Adapter.image_layouts`; feature rows count tiles
        across the images in order.
    """
    h = w = config.vision_config.image_size // config.vision_config.patch_size
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r, c = r.flatten(), c.flatten()  # [h*w]
    grids, coords = [], []
    for size, n in zip(image_sizes, n_tiles):
        # tiles 1.. fill a (tiles_h x tiles_w) grid in row-major order, as `pack` views them
        tiles_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)[1] if n > 1 else 1
        k = torch.arange(n)[:, None]  # [n, 1]; tile 0 (the base image) keeps its own coordinates
        tile_row = torch.where(k == 0, 0, (k - 1).div(tiles_w, rounding_mode="floor"))
        tile_col = torch.where(k == 0, 0, (k - 1) % tiles_w)
        global_row, global_col = tile_row * h + r, tile_col * w + c  # [n, h*w]
        coords.append(torch.stack([torch.ones(n, h * w), global_row + 1.0, global_col + 1.0], dim=-1))
        grids.append(tiles_w)
    packed, _ = pack(coords, image_sizes, image_newline=torch.zeros(3), vision_aspect_ratio=config.vision_aspect_ratio)
    out, first_row = [], 0
    for n, tiles_w, feats in zip(n_tiles, grids, packed):
        newline = feats[:, 0] < 0.5
        nearest = (feats[:, 1:] - 1.0 + 0.5).floor().long()  # [tokens, 2] global (row, col) of the nearest patch
        grow, gcol = nearest[:, 0], nearest[:, 1]
        base = torch.arange(len(feats)) < h * w  # `pack` puts the base image first
        tile = torch.where(base, 0, 1 + grow.div(h, rounding_mode="floor") * tiles_w + gcol.div(w, rounding_mode="floor"))
        row, col = grow % h, gcol % w
        minus = torch.full_like(tile, -1)
        out.append(torch.stack([
            torch.where(newline, minus, tile),
            torch.where(newline, minus, row),
            torch.where(newline, minus, col),
            torch.where(newline, minus, first_row + tile),
            torch.where(newline, minus, row * w + col),
        ], dim=1))
        first_row += n
    return out

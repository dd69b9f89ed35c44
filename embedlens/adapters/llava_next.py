"""LLaVA-NeXT (LLaVA-1.6, `LlavaNextForConditionalGeneration`): anyres tiles with unpadding and newline tokens.

Each image is a base (overview) image plus a grid of tiles cut from the image
resized to the best of `image_grid_pinpoints`. The tiles' features are
stitched into one grid, the rows and columns that only show padding are cut
away ("unpadding"), and a learned `image_newline` vector ends every row of
that grid; the base image's features come first, without newlines.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from embedlens.adapters._anyres import packed_layouts
from embedlens.adapters.base import Adapter
from embedlens.adapters.capabilities import Capability
from embedlens.registry import adapters


@adapters.register("llava_next")
class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT: CLIP (or SigLIP) tower, MLP projector, anyres tiles (base image + unpadded tile grid with newline tokens)."""

    architectures = ("LlavaNextForConditionalGeneration",)
    model_class = LlavaNextForConditionalGeneration
    vision_towers = ("clip_vision_model", "siglip_vision_model")
    capabilities = frozenset({Capability.VISION_FEATURE_LAYER, Capability.IMAGE_NEWLINE})

    def n_tiles(self, inputs: BatchFeature) -> list[int]:
        """Tiles of each image of the batch (base image included), as the model splits `pixel_values`."""
        cfg = self.config
        return [
            image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size)
            for s in inputs["image_sizes"]
        ]

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        """The model's own `pack_image_features`, run on patch coordinates (see `packed_layouts`)."""
        sizes = inputs["image_sizes"]
        strategy = self.config.vision_feature_select_strategy

        def pack(coords: list[torch.Tensor]):
            return self.model.model.pack_image_features(
                coords, sizes, vision_feature_select_strategy=strategy, image_newline=torch.zeros(3)
            )[0]

        return packed_layouts(self.n_tiles(inputs), self.grid(), pack)

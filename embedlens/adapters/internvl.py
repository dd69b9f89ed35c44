"""InternVL (`InternVLForConditionalGeneration`): InternViT tower, pixel shuffle, dynamic tiling with a thumbnail.

An image is cut into a grid of square tiles whose aspect ratio best matches
it (between `min_patches` and `max_patches` tiles); when there is more than
one, a thumbnail (the whole image, resized) follows them. Each tile goes
through the tower (CLS first, dropped by the "default" strategy); the model's
pixel shuffle then folds every 2 x 2 block of patches into one token *before*
the projector, so here ``vision.features`` (the projector's input) has one row
per token, not per patch. In the prompt an image is ``<img>`` + its tokens +
``</img>``.

Role map: tile 0 is the thumbnail (or the only tile), tiles 1.. the crops in
row-major order; row/col are the token's cell in its tile's token grid.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, InternVLForConditionalGeneration, InternVLProcessor

from embedlens.adapters.base import Adapter, ModulePaths
from embedlens.adapters.capabilities import Capability
from embedlens.errors import AdapterError
from embedlens.registry import adapters


class InternVLImageProcessor(InternVLProcessor):
    """`InternVLProcessor` without its video processor.

    The stock processor will not construct without torchvision (its video
    processor needs it); images alone need only the PIL image processor.
    """

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor, tokenizer, image_seq_length: int = 256, chat_template: str | None = None):
        super().__init__(image_processor, tokenizer, video_processor=None, image_seq_length=image_seq_length, chat_template=chat_template)


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


@adapters.register("internvl")
class InternVLAdapter(Adapter):
    """InternVL: InternViT tower (with CLS), pixel shuffle before an MLP projector, Qwen2/Llama LLM; tiles + a thumbnail."""

    architectures = ("InternVLForConditionalGeneration",)
    model_class = InternVLForConditionalGeneration
    paths = ModulePaths(vision_layers="model.vision_tower.encoder.layer")
    capabilities = frozenset({Capability.VISION_FEATURE_LAYER, Capability.PRE_PROJECTOR_MERGE})

    image_only_processor = InternVLImageProcessor
    image_only_keys = ("image_seq_length", "chat_template")
    # InternVL's own names (its model cards' load_image(max_num=...) / config) for the HF image processor's tiling:
    # tiles per image between min and max (plus a thumbnail), or no tiling
    processor_options = {"max_dynamic_patch": ("max_patches", int), "min_dynamic_patch": ("min_patches", int),
                         "dynamic_image_size": ("crop_to_patches", bool)}

    @property
    def patch_block(self) -> tuple[int, int]:
        s = round(1 / float(self.config.downsample_ratio))
        return s, s

    def grid(self) -> tuple[int, int]:
        v = self.config.vision_config
        (ih, iw), (ph, pw) = _pair(v.image_size), _pair(v.patch_size)
        bh, bw = self.patch_block
        return ih // ph // bh, iw // pw // bw

    def n_tiles(self, inputs: BatchFeature) -> list[int]:
        """Tiles of each image of the batch (crops and thumbnail), counted from its image tokens."""
        flat = inputs["input_ids"].flatten()  # sample-major, so images stay in batch order
        end = flat == int(self.processor.end_image_token_id)
        image_of = torch.cumsum(end.long(), 0) - end.long()  # images closed before each position
        ctx = flat == self.image_token_id
        counts = torch.bincount(image_of[ctx], minlength=int(end.sum()))[: int(end.sum())]
        rows, cols = self.grid()
        if bool((counts % (rows * cols)).any()):
            raise AdapterError(f"{self.name}: image token counts {counts.tolist()} are not whole tiles of {rows * cols} tokens")
        return (counts // (rows * cols)).tolist()

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        gh, gw = self.grid()
        r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        r, c = r.flatten(), c.flatten()
        out, first_row = [], 0
        for n in self.n_tiles(inputs):
            # crops in row-major order, then the thumbnail (tile 0); a single tile is the whole image
            tiles = list(range(1, n)) + [0] if n > 1 else [0]
            parts = [torch.stack([torch.full_like(r, t), r, c, torch.full_like(r, first_row + k), r * gw + c], dim=1) for k, t in enumerate(tiles)]
            out.append(torch.cat(parts))
            first_row += n
        return out

    def placeholder_text(self, inputs: BatchFeature, image: int, n_tokens: int) -> str:
        # As InternVLProcessor.replace_image_token.
        p = self.processor
        return f"{p.start_image_token}{self.image_placeholder * n_tokens}{p.end_image_token}"

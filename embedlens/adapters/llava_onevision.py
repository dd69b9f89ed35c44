"""LLaVA-OneVision: SigLIP tower, anyres tiling with newline tokens, Qwen2 LLM."""

from __future__ import annotations

import torch
from transformers import BatchFeature, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from embedlens.adapters.base import Adapter
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
class LlavaOnevisionAdapter(Adapter):
    """LLaVA-OneVision: SigLIP tower, anyres tiles (base image + unpadded tile grid with newline tokens), Qwen2."""

    architectures = ("LlavaOnevisionForConditionalGeneration",)
    model_class = LlavaOnevisionForConditionalGeneration
    has_image_newline = True

    @classmethod
    def load_processor(cls, path: str):
        from transformers import AutoImageProcessor, AutoTokenizer

        # Without torchvision AutoProcessor fails or degrades to the bare tokenizer
        # (its video processor needs torchvision); then build the image-only one.
        try:
            processor = super().load_processor(path)
        except Exception:  # noqa: BLE001 - any failure here has the same remedy
            processor = None
        if hasattr(processor, "image_processor"):
            return processor
        return OnevisionImageProcessor(
                image_processor=AutoImageProcessor.from_pretrained(path),
                tokenizer=AutoTokenizer.from_pretrained(path),
                **{k: v for k, v in OnevisionImageProcessor.get_processor_dict(path)[0].items()
                   if k in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "chat_template")},
            )

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        """Run the model's own `pack_image_features` on patch coordinates instead of features.

        Each tile's features are replaced by (tile + 1, global row + 1, global
        col + 1); the newline vector is zeros. Whatever the model does to
        features (unpadding, newline insertion, anyres_max downsampling) it
        then does to the coordinates, so the layout cannot drift from the
        model's code. Downsampled grids interpolate coordinates; they are
        rounded to the nearest source patch.
        """
        cfg = self.config
        h, w = self.grid()
        image_sizes = inputs["image_sizes"]
        batch_num_images = inputs.get("batch_num_images")
        model = self.model.model
        if batch_num_images is None:
            need = [True] * len(image_sizes)
        else:
            need = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        n_tiles = [
            image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size)
            if p else 1
            for s, p in zip(image_sizes, need)
        ]
        r, c = torch.meshgrid(torch.arange(h) + 1.0, torch.arange(w) + 1.0, indexing="ij")
        # coords[i]: [tiles, h*w, 3] = (tile + 1, row + 1, col + 1); tile 0 is the base image
        coords = [
            torch.stack([torch.full((n, h * w), 1.0) + torch.arange(n)[:, None], r.flatten().expand(n, -1), c.flatten().expand(n, -1)], dim=-1)
            for n in n_tiles
        ]
        packed, _ = model.pack_image_features(
            coords, image_sizes, image_newline=torch.zeros(3), vision_aspect_ratio=cfg.vision_aspect_ratio
        )
        out, first_row = [], 0
        for n, feats in zip(n_tiles, packed):
            feats = feats.round().long()
            newline = feats[:, 0] == 0
            tile = feats[:, 0] - 1
            row, col = feats[:, 1] - 1, feats[:, 2] - 1
            fcol = torch.where(newline, -1, row * w + col)
            frow = torch.where(newline, -1, first_row + tile)
            row = torch.where(newline, -1, row)
            col = torch.where(newline, -1, col)
            out.append(torch.stack([torch.where(newline, -1, tile), row, col, frow, fcol], dim=1))
            first_row += n
        return out

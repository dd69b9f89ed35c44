"""LLaVA-OneVision-1.5: a native-resolution RICE-ViT tower with a class token per image, Qwen3 LLM, 1-D positions.

The layout is Qwen2-VL's (`embedlens.adapters.qwen2_vl`): the image processor
(``Qwen2VLImageProcessor`` with ``temporal_patch_size = 1``) resizes each image
to multiples of ``patch_size * spatial_merge_size`` and writes one
``pixel_values`` row per patch, in merge-window order (each 2 x 2 block's four
patches in row-major order, blocks in row-major order); the tower runs the
batch's images as one packed sequence and its merger folds each block of 4
consecutive rows into one visual token. In the prompt an image is
``<|vision_start|>`` + ``(h / 2) * (w / 2)`` ``<|image_pad|>`` tokens +
``<|vision_end|>``.

What differs from Qwen2-VL:

- The tower prepends a learned class token to each image (``cls_embeddings``)
  before its blocks and drops it again before the merger. ``vision.layers[i]``
  is the block's output *without* those class rows (`site_value` drops the
  first row of each image), so every vision site is ``[1, patches, d]`` in the
  packed order and a token's block is rows ``4 * feature_col .. + 3``, as for
  Qwen2-VL. ``vision.embed`` is the patch embedding (no class rows either).
- The language model's positions are 1-D (the model counts ``arange(seq)``;
  rotary embeddings are relative, so a sample's own count, padding excluded, is
  the same run): no M-RoPE, no ``get_rope_index``.
- The tower has no window attention and no DeepStack.

Example:
    >>> from embedlens import Sample, load_model
    >>> from embedlens.testing.images import shapes
    >>> adapter = load_model("tiny:llava_onevision1_5")
    >>> batch = adapter.encode([Sample([shapes(64)], question="what is it?")])
    >>> batch.inputs["image_grid_thw"].tolist(), adapter.image_grids(batch.inputs)  # 8 x 8 patches, 4 x 4 tokens
    ([[1, 8, 8]], [(4, 4)])
    >>> adapter.position_ids(batch.inputs).shape[0]  # one sample: 1-D positions
    1
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, LlavaOnevision15ForConditionalGeneration
from transformers.models.exaone4_5.processing_exaone4_5 import Exaone4_5_Processor

from embedlens.adapters.capabilities import Capability, Positions
from embedlens.adapters.qwen2_vl import Qwen2VLAdapter, _image_only
from embedlens.registry import adapters
from embedlens.sites import Site

#: The family's processor (transformers maps ``llava_onevision1_5`` to EXAONE 4.5's) without its video processor.
OnevisionImageProcessor15 = _image_only(Exaone4_5_Processor)
OnevisionImageProcessor15.__name__ = OnevisionImageProcessor15.__qualname__ = "OnevisionImageProcessor15"


@adapters.register("llava_onevision1_5")
class LlavaOnevision15Adapter(Qwen2VLAdapter):
    """LLaVA-OneVision-1.5: Qwen2-VL's packed layout, a class token per image in the tower, 1-D LLM positions."""

    architectures = ("LlavaOnevision15ForConditionalGeneration",)
    model_class = LlavaOnevision15ForConditionalGeneration
    capabilities = frozenset({Capability.PACKED_TOWER})
    image_only_processor = OnevisionImageProcessor15

    # 1-D positions: the core's count (the model's arange, shifted past left padding; rotary is relative)
    position_ids = Positions.position_ids

    def site_value(self, site: Site, value: torch.Tensor, inputs: BatchFeature) -> torch.Tensor:
        if site.component == "vision.layers" and value.dim() == 2:
            value = value[_patch_rows(inputs["image_grid_thw"]).to(value.device)]
        return super().site_value(site, value, inputs)


def _patch_rows(grid_thw: torch.Tensor) -> torch.Tensor:
    """Rows of the tower's blocks that hold patches: each image's rows after its class token, in order."""
    n = grid_thw.prod(-1)  # patches per image
    image = torch.repeat_interleave(torch.arange(len(n)), n)
    return torch.arange(int(n.sum())) + image + 1  # image k's patches sit after k + 1 class tokens


__all__ = ["LlavaOnevision15Adapter", "OnevisionImageProcessor15"]

"""LLaVA-1.5 style models (`LlavaForConditionalGeneration`) with a CLIP or SigLIP tower.

The tower is whatever the config says; the CLS rule follows
`vision_feature_select_strategy` ("default" drops CLIP's CLS token, "full"
keeps every token, as SigLIP has no CLS).
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, LlavaForConditionalGeneration

from embedlens.adapters.base import Adapter
from embedlens.adapters.capabilities import Capability
from embedlens.registry import adapters


@adapters.register("llava")
class LlavaAdapter(Adapter):
    """LLaVA-1.5: vision tower (CLIP or SigLIP), 2-layer MLP projector, LLaMA-style LLM."""

    architectures = ("LlavaForConditionalGeneration",)
    model_class = LlavaForConditionalGeneration
    capabilities = frozenset({Capability.VISION_FEATURE_LAYER})  # later encoder layers are skipped

    vision_towers = ("clip_vision_model", "siglip_vision_model")  # a Pixtral tower is `LlavaPixtralAdapter`'s

    @property
    def tower(self) -> str:
        """'clip' or 'siglip' (or the vision config's model type)."""
        return self.config.vision_config.model_type.replace("_vision_model", "")

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        return self._plain_layouts(int(inputs["pixel_values"].shape[0]))

"""Pixtral-12B: `LlavaForConditionalGeneration` with a Pixtral vision tower (``vision_config.model_type == "pixtral"``).

The image span, the processor (`PixtralProcessor`: ``[IMG]`` rows ended by ``[IMG_BREAK]``, the last by
``[IMG_END]``) and the packed native-resolution tower are Mistral 3's (`embedlens.adapters.mistral3`, whose
docstring describes them); what differs is LLaVA's projector. It is LLaVA's two-layer MLP on the selected hidden
state, with no patch merger: every patch is one visual token (``spatial_merge_size`` 1, the processor's default,
which Pixtral-12B's uses), so ``vision.features`` and ``projector`` are both ``[1, patches, d]`` and a token's
``feature_col`` is its patch's row of the packed tower sequence. ``LlavaModel.get_image_features`` passes
``image_sizes`` to the tower and splits the projector output per image by them.

`load_model` picks this adapter over ``llava`` from the config's vision tower (`Adapter.mismatch`).
``vision_feature_select_strategy="default"`` (drop the first tower row, CLIP's CLS) would drop the first
*patch* of the packed sequence and leave one image token without a feature; Pixtral-12B uses ``"full"``,
and ``"default"`` is refused at load.

Example:
    >>> from embedlens import Sample, load_model
    >>> from embedlens.testing.images import noise
    >>> adapter = load_model("tiny:llava_pixtral")
    >>> batch = adapter.encode([Sample([noise(40, 70)], question="what is it?")])
    >>> batch.inputs["image_sizes"].tolist(), adapter.image_grids(batch.inputs)  # 5 x 8 patches, one token each
    ([[40, 64]], [(5, 8)])
"""

from __future__ import annotations

from transformers import BatchFeature, LlavaForConditionalGeneration, PreTrainedModel, ProcessorMixin

from embedlens.adapters.mistral3 import Mistral3Adapter
from embedlens.errors import AdapterError
from embedlens.registry import adapters


@adapters.register("llava_pixtral")
class LlavaPixtralAdapter(Mistral3Adapter):
    """Pixtral-12B: Pixtral tower (packed, 2-D RoPE, native resolution), LLaVA's MLP projector, Mistral LLM.

    One visual token per patch; see the module docstring."""

    architectures = ("LlavaForConditionalGeneration",)
    model_class = LlavaForConditionalGeneration

    vision_towers = ("pixtral",)

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, source: str | None = None):
        super().__init__(model, processor, source)
        if self.feature_select_strategy != "full":
            raise AdapterError(
                f"{self.name}: vision_feature_select_strategy must be 'full' with a Pixtral tower (it has no CLS "
                f"token; 'default' would drop the first patch of the packed sequence); got {self.feature_select_strategy!r}"
            )
        merge = getattr(processor, "spatial_merge_size", 1)
        if merge != 1:
            raise AdapterError(
                f"{self.name}: the processor's spatial_merge_size must be 1 (LLaVA's projector merges no patches: one "
                f"[IMG] token per patch); got {merge}"
            )

    @property
    def merge_size(self) -> int:
        return 1

    @property
    def tower(self) -> str:
        return "pixtral"

    def projector_args(self, inputs: BatchFeature) -> tuple:
        return ()  # LLaVA's projector takes the features only

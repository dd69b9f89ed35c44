"""PaliGemma (`PaliGemmaForConditionalGeneration`): SigLIP tower, linear projector, Gemma.

Image tokens come first, then BOS, the prompt and a newline; image and prompt
form a bidirectional prefix (prefix-LM attention) and the answer is passed as
the processor's `suffix`, attended causally.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, PaliGemmaForConditionalGeneration

from embedlens.adapters.base import Adapter, ModulePaths, PromptText
from embedlens.adapters.capabilities import Capability
from embedlens.data import Sample
from embedlens.registry import adapters
from embedlens.roles import Role


@adapters.register("paligemma")
class PaliGemmaAdapter(Adapter):
    """PaliGemma: SigLIP tower, linear projector (scaled by 1/sqrt(d)), Gemma LLM with prefix-LM attention."""

    architectures = ("PaliGemmaForConditionalGeneration",)
    model_class = PaliGemmaForConditionalGeneration
    vision_towers = ("siglip_vision_model",)
    capabilities = frozenset({Capability.ANSWER_SUFFIX})
    position_offset = 1

    @property
    def paths(self) -> ModulePaths:  # type: ignore[override]
        # PaliGemma 2's Gemma 2 layers norm each update before the residual add (in Gemma 1,
        # `post_attention_layernorm` is the norm *before* the MLP, so the paths depend on the text model)
        if self.model.config.text_config.model_type == "gemma2":
            return ModulePaths(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")
        return ModulePaths()

    @property
    def feature_select_strategy(self) -> str:
        # PaliGemmaModel projects every SigLIP token, whatever the config's
        # vision_feature_select_strategy says (HF's own PaliGemma testers set "default").
        return "full"

    def block_ids(self, inputs: BatchFeature) -> torch.Tensor | None:
        # As PaliGemmaModel: the prefix (token type 0) is one bidirectional block.
        types = inputs.get("token_type_ids")
        return None if types is None else torch.where(types == 0, 0, -1)

    def prompt(self, sample: Sample) -> PromptText:
        if sample.prompt is not None:
            return super().prompt(sample)
        question = sample.question or ""
        text = self.image_placeholder * len(sample.images) + question
        start = len(text) - len(question)
        return PromptText(text, {Role.QUESTION: [(start, len(text))]}, suffix=sample.answer)

    def continuation_ids(self, sample: Sample, text: str) -> list[int]:
        # The processor tokenises the suffix on its own, after the prefix's newline.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def processor_text(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        # PaliGemmaProcessor puts BOS after the last image placeholder and a
        # newline at the end of the prompt.
        ph, bos = self.image_placeholder, self.tokenizer.bos_token
        at = text.rindex(ph) + len(ph)
        return text[:at] + bos + text[at:] + "\n", [(at, len(bos)), (len(text), 1)]

    def _adds_special_tokens(self) -> bool:
        return False  # the processor writes BOS into the text itself

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        return self._plain_layouts(int(inputs["pixel_values"].shape[0]))

"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP tower, average pooling, Gemma 3 LLM.

Each image is one square SigLIP tile. The projector (``Gemma3MultiModalProjector``)
average-pools the tower's patch grid in ``k x k`` blocks to ``mm_tokens_per_image``
tokens (256 = 16 x 16 on the released checkpoints, from 64 x 64 patches: ``k = 4``),
normalises and projects them; so each visual token stands for the ``k x k`` block
of patches it pooled (`patch_block`), and ``vision.features`` (the projector's
input) keeps one row per patch. In the prompt an image is
``\\n\\n<start_of_image>`` + its tokens + ``<end_of_image>\\n\\n``: the processor
replaces each ``<start_of_image>`` the text holds with that sequence. The markers
are SPECIAL in the role map; only the soft tokens between them are VISUAL.

Attention: the tokens of one image attend to each other both ways (the
processor's ``token_type_ids``; `block_ids`), everything else is causal; the
language model interleaves sliding-window layers (window ``sliding_window``) with
global ones (``layer_types``), and the sliding layers AND the window with that
mask (Hugging Face's ``create_masks_for_vision_model``). The intervention engine
builds both per layer (`embedlens.interventions.engine`).

Sites: ``llm.embed`` is what the language model receives: text rows are
``embed_tokens`` rows *already scaled* by ``sqrt(hidden_size)``
(``Gemma3TextScaledWordEmbedding``), image rows the projector's output as is
(unscaled). ``adapter.input_embeddings()`` is the unscaled matrix; the lenses
compare by cosine, which the scale does not change.

Logit softcapping: ``Gemma3ForConditionalGeneration`` (transformers 5.24) applies
no final-logit softcapping even when ``text_config.final_logit_softcapping`` is
set (only the text-only ``Gemma3ForCausalLM`` does; released Gemma 3 configs set
none), so `final_logit_softcap` is None here and ``llm.unembed``, the logit lens
and the engine give the model's own logits (``outputs.logits``).

Pan-and-scan (extra crops of wide images, off in ``Gemma3Processor`` by
default) is switched off when encoding: its crops are not mapped yet.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import BatchFeature, Gemma3ForConditionalGeneration

from embedlens.adapters.base import Adapter, ModulePaths
from embedlens.adapters.capabilities import Capability
from embedlens.data import Sample
from embedlens.errors import AdapterError
from embedlens.registry import adapters


@adapters.register("gemma3")
class Gemma3Adapter(Adapter):
    """Gemma 3: SigLIP tower, average pooling to mm_tokens_per_image tokens, Gemma 3 LLM with sliding and global layers.

    Each image's tokens attend to each other both ways (`block_ids`); see the module docstring for the sites.
    """

    architectures = ("Gemma3ForConditionalGeneration",)
    model_class = Gemma3ForConditionalGeneration
    vision_towers = ("siglip_vision_model",)
    # Gemma 3 layers norm each update before the residual add: the .attn/.mlp sites are those norms' outputs
    paths = ModulePaths(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")
    # sliding layers: AND(window, OR(causal, image blocks)) (create_masks_for_vision_model)
    capabilities = frozenset({Capability.WINDOWED_BLOCKS})

    @property
    def feature_select_strategy(self) -> str:
        return "full"  # the projector pools every SigLIP patch (SigLIP has no CLS token)

    @property
    def final_logit_softcap(self) -> float | None:
        return None  # the multimodal model never applies text_config.final_logit_softcapping (see the module docstring)

    @property
    def patch_block(self) -> tuple[int, int]:
        # as Gemma3MultiModalProjector: kernel = patches per side // int(sqrt(mm_tokens_per_image)); the pooled grid is
        # then patches // kernel per side (HF's tester sets mm_tokens_per_image=2 and gets one token per image)
        v = self.config.vision_config
        patches = v.image_size // v.patch_size
        side = int(self.config.mm_tokens_per_image**0.5)
        if not 0 < side <= patches:
            raise AdapterError(
                f"{self.name}: mm_tokens_per_image={self.config.mm_tokens_per_image} does not pool the tower's "
                f"{patches} x {patches} patches (expected 1 to {patches * patches} tokens)"
            )
        k = patches // side
        return k, k

    def special_token_ids(self) -> set[int]:
        return super().special_token_ids() | {int(self.config.boi_token_id), int(self.config.eoi_token_id)}

    def processor_kwargs(self, samples: Sequence[Sample]) -> dict[str, Any]:
        return {"do_pan_and_scan": False}

    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        return self._plain_layouts(int(inputs["pixel_values"].shape[0]))

    def placeholder_text(self, inputs: BatchFeature, image: int, n_tokens: int) -> str:
        # As Gemma3Processor.full_image_sequence.
        tok = self.tokenizer
        soft = tok.convert_ids_to_tokens(self.image_token_id)
        return f"\n\n{tok.convert_ids_to_tokens(int(self.config.boi_token_id))}{soft * n_tokens}{tok.convert_ids_to_tokens(int(self.config.eoi_token_id))}\n\n"

    def block_ids(self, inputs: BatchFeature) -> torch.Tensor | None:
        """Each image's tokens (a run of token type 1) form one bidirectional block, numbered per sample."""
        types = inputs.get("token_type_ids")
        if types is None:
            types = (inputs["input_ids"] == self.image_token_id).long()
        image = types == 1
        start = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        return torch.where(image, start.long().cumsum(dim=1) - 1, -1)

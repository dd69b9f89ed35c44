"""Qwen3.5: Qwen3-VL's native-resolution tower on a hybrid language model (Gated DeltaNet and full attention).

The image side is Qwen3-VL's without DeepStack: the image processor cuts each
image into a ``(1, h, w)`` grid of patches in merge-window order, the packed
tower (learned, interpolated position embeddings and 2-D rotary) runs the
batch's patches as one sequence, and the merger folds each 2 x 2 block into
one visual token. In the prompt an image is ``<|vision_start|>`` + ``(h / 2) *
(w / 2)`` image tokens + ``<|vision_end|>``; positions are 3-D M-RoPE ids from
the model's ``get_rope_index`` (`embedlens.adapters.qwen2_vl` says more; the
layout, vision sites and positions are that module's).

The language model interleaves two kinds of decoder layers
(``config.text_config.layer_types``; three ``linear_attention`` to one
``full_attention`` in the released models): a full-attention layer has
``self_attn``, a linear-attention layer a Gated DeltaNet mixer
(``linear_attn``) whose output depends on the tokens before it through a
recurrent state, with no attention matrix. The site ``llm.layers[i].attn``
reads whichever mixer the layer has (`ModulePaths.linear_attn`). What the
interventions do on the DeltaNet layers (`embedlens.interventions.engine`):

- pruning (by removal), injection and withdrawal change the rows the layer
  scans, so its state is that of a Hugging Face run of the tokens present;
- pruning by mask zeroes the pruned tokens' input to the mixer, as Hugging
  Face does for a 0 in the 2-D attention mask (the scan still takes the step);
- ``skip_sublayer`` zeroes the mixer's update as the "attention" sublayer;
- attention knockout, FastV and ``attention_flow`` read or mask an attention
  matrix: they refuse linear-attention layers by name and list the layers
  where they apply;
- decoding from the engine's prefill keeps each DeltaNet layer's input rows
  instead of a key/value cache and runs the layer again over them and the new
  tokens (`embedlens.interventions.engine`), as Hugging Face's generation.

Example:
    >>> from embedlens import Sample, load_model
    >>> from embedlens.testing.images import shapes
    >>> adapter = load_model("tiny:qwen3_5")
    >>> adapter.config.text_config.layer_types
    ['linear_attention', 'full_attention', 'linear_attention', 'full_attention']
    >>> batch = adapter.encode([Sample([shapes(64)], question="what is it?")])
    >>> adapter.image_grids(batch.inputs)  # 8 x 8 patches, 4 x 4 tokens
    [(4, 4)]
"""

from __future__ import annotations

from dataclasses import replace

from transformers import Qwen3_5ForConditionalGeneration

from embedlens.adapters.qwen2_vl import _QWEN_PATHS, Qwen2VLAdapter, Qwen3VLImageProcessor
from embedlens.adapters.qwen2_vl_video import Qwen3Video
from embedlens.registry import adapters

Qwen3_5ImageProcessor = Qwen3VLImageProcessor  # Qwen3.5 ships Qwen3-VL's processor

_QWEN3_5_PATHS = replace(_QWEN_PATHS, linear_attn="linear_attn")


@adapters.register("qwen3_5")
class Qwen3_5Adapter(Qwen3Video, Qwen2VLAdapter):
    """Qwen3.5: Qwen3-VL's tower and layout without DeepStack; a hybrid Gated DeltaNet / full-attention LLM."""

    architectures = ("Qwen3_5ForConditionalGeneration",)
    model_class = Qwen3_5ForConditionalGeneration
    # VIDEO: Qwen3-VL's video prompts, a timestamp before each temporal patch (`qwen2_vl_video.Qwen3Video`)
    capabilities = Qwen2VLAdapter.capabilities
    paths = _QWEN3_5_PATHS
    image_only_processor = Qwen3_5ImageProcessor

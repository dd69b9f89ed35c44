"""Qwen3-VL-MoE: Qwen3-VL (native-resolution tower, DeepStack, M-RoPE) on a mixture-of-experts language model.

The image side, positions and DeepStack are Qwen3-VL's (`embedlens.adapters.qwen2_vl`). In the language model
the MLP of each decoder layer (``mlp``) is a sparse block (``Qwen3VLMoeTextSparseMoeBlock``: a top-k router,
``mlp.gate``, and the experts) except in ``mlp_only_layers`` and between the ``decoder_sparse_step`` layers,
where it is a dense MLP. The ``llm.layers[i].mlp`` site reads the block's output, the weighted sum of the
chosen experts' outputs. Each token is routed alone (top-k of its own router logits, no capacity limit), so
routing follows whatever sequence the engine runs: a pruned token is routed nowhere, the kept ones as in a
Hugging Face run of the shortened sequence, a withdrawn or injected one only in the layers it is present in.
The site ``llm.layers[i].experts`` gives the experts each token is routed to in a sparse layer, ``[batch, seq,
top_k]`` ids as its router (``mlp.gate``: the top-k of the softmax over its logits) chose them; a dense layer
refuses it, naming the sparse ones (`Adapter.expert_layers`).

Example:
    >>> from embedlens import load_model
    >>> adapter = load_model("tiny:qwen3_vl_moe")
    >>> [type(layer.mlp).__name__ for layer in adapter.model.model.language_model.layers]
    ['Qwen3VLMoeTextMLP', 'Qwen3VLMoeTextSparseMoeBlock', 'Qwen3VLMoeTextMLP', 'Qwen3VLMoeTextSparseMoeBlock']
    >>> adapter.expert_layers
    [1, 3]
"""

from __future__ import annotations

from dataclasses import replace

from transformers import Qwen3VLMoeForConditionalGeneration

from embedlens.adapters.qwen2_vl import Qwen3VLAdapter, Qwen3VLImageProcessor
from embedlens.registry import adapters

Qwen3VLMoeImageProcessor = Qwen3VLImageProcessor  # Qwen3-VL-MoE ships Qwen3-VL's processor


@adapters.register("qwen3_vl_moe")
class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: Qwen3-VL's tower, layout and DeepStack; sparse mixture-of-experts MLPs in the LLM."""

    architectures = ("Qwen3VLMoeForConditionalGeneration",)
    model_class = Qwen3VLMoeForConditionalGeneration
    image_only_processor = Qwen3VLMoeImageProcessor
    paths = replace(Qwen3VLAdapter.paths, router="mlp.gate")  # the sparse blocks' router (dense layers have none)

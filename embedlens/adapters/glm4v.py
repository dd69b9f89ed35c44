"""GLM-4V (GLM-4.1V) and GLM-4.5V: Qwen2-VL's packed native-resolution layout, a tower that merges patches itself.

The image processor (``Glm4vImageProcessor``) resizes each image to multiples of
``patch_size * spatial_merge_size`` and writes one ``pixel_values`` row per
patch in merge-window order (each 2 x 2 block's four patches in row-major
order, blocks in row-major order), as Qwen2-VL's does; the tower runs the
batch's images as one packed sequence. In the prompt an image is
``<|begin_of_image|>`` + ``(h / 2) * (w / 2)`` ``<|image|>`` tokens +
``<|end_of_image|>``; positions are 3-D M-RoPE ids from the model's own
``get_rope_index`` (`embedlens.adapters.qwen2_vl` says more: the layout,
packed vision sites and positions are that module's).

What differs from Qwen2-VL:

- The tower merges each block of ``spatial_merge_size`` x ``spatial_merge_size``
  patches *before* its merger: after the blocks, ``post_layernorm`` and a
  strided convolution (``downsample``) fold each block of 4 consecutive rows
  into one row, and the merger (the ``projector`` site) maps those rows one to
  one. So ``vision.features`` (the merger's input) has one row per visual token
  (`Capability.PRE_PROJECTOR_MERGE`, indexed by ``feature_col``), while
  ``vision.embed`` and ``vision.layers[i]`` have one row per patch: a token's
  block is rows ``4 * feature_col .. + 3`` there.
- Each decoder layer norms its attention and MLP outputs before the residual
  add (``post_self_attn_layernorm``, ``post_mlp_layernorm``): the ``.attn`` and
  ``.mlp`` sites read those norms (the updates the residual stream receives).
- The frame tokens are ``<|begin_of_image|>`` / ``<|end_of_image|>``
  (``image_start_token_id`` / ``image_end_token_id``).
- GLM-4.5V (`Glm4vMoeAdapter`, ``glm4v_moe``) has the same tower and layout on a mixture-of-experts language
  model whose decoder layers are plain pre-norm ones (no post-norms).
- The largest image the processor keeps is smaller than ``size.longest_edge``
  pixels: its resize counts ``temporal_patch_size`` copies of an image
  against that bound (`grid`).

Example:
    >>> from embedlens import Sample, load_model
    >>> from embedlens.testing.images import shapes
    >>> adapter = load_model("tiny:glm4v")
    >>> batch = adapter.encode([Sample([shapes(64)], question="what is it?")])
    >>> batch.inputs["image_grid_thw"].tolist(), adapter.image_grids(batch.inputs)  # 8 x 8 patches, 4 x 4 tokens
    ([[1, 8, 8]], [(4, 4)])
    >>> adapter.position_ids(batch.inputs).shape[0]  # (t, h, w)
    3
"""

from __future__ import annotations

from dataclasses import replace

from transformers import Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration, Glm4vProcessor

from embedlens.adapters.capabilities import Capability
from embedlens.adapters.qwen2_vl import _QWEN_PATHS, Qwen2VLAdapter, _image_only
from embedlens.registry import adapters

#: GLM-4V's processor without its video processor (which needs torchvision).
Glm4vImageProcessor = _image_only(Glm4vProcessor)

# Qwen-VL's module paths, with the post-norms GLM applies to each sublayer's update before its residual add
_GLM4V_PATHS = replace(_QWEN_PATHS, attn_out="post_self_attn_layernorm", mlp_out="post_mlp_layernorm")


@adapters.register("glm4v")
class Glm4vAdapter(Qwen2VLAdapter):
    """GLM-4V: Qwen2-VL's packed layout and M-RoPE; the tower merges 2 x 2 patches before its merger (the projector)."""

    architectures = ("Glm4vForConditionalGeneration",)
    model_class = Glm4vForConditionalGeneration
    paths = _GLM4V_PATHS
    # no VIDEO: GLM-4V's video prompts (each frame framed as an image with its timestamp, filled with image tokens)
    # are not written by embedlens yet
    capabilities = (Qwen2VLAdapter.capabilities - {Capability.VIDEO}) | {Capability.PRE_PROJECTOR_MERGE}
    image_only_processor = Glm4vImageProcessor

    def grid(self) -> tuple[int, int]:
        """The token grid of the largest square image the image processor keeps: its resize bounds
        ``temporal_patch_size`` copies of the image by ``size.longest_edge`` pixels (GLM-4V's ``smart_resize``)."""
        ip = self.processor.image_processor
        factor = int(ip.patch_size) * int(ip.merge_size)
        side = int((int(ip.size["longest_edge"]) / int(ip.temporal_patch_size)) ** 0.5) // factor
        return side, side

    def special_token_ids(self) -> set[int]:
        # <|begin_of_image|> / <|end_of_image|> frame each image: image structure, not text (the tokenizer's specials
        # and these, not Qwen's <|vision_start|> ids, which GLM's config does not have)
        ids = {int(self.config.image_start_token_id), int(self.config.image_end_token_id)}
        return super(Qwen2VLAdapter, self).special_token_ids() | ids


@adapters.register("glm4v_moe")
class Glm4vMoeAdapter(Glm4vAdapter):
    """GLM-4.5V: GLM-4V's tower and layout on a mixture-of-experts LM (pre-norm layers, no post-norms).

    From layer ``first_k_dense_replace`` on, each decoder layer's MLP is a sparse block: a sigmoid router picks
    ``num_experts_per_tok`` routed experts per token (within the best ``topk_group`` of ``n_group`` groups), whose
    weighted outputs are added to a shared expert's. ``llm.layers[i].mlp`` reads the block's output. Each token is
    routed alone, so routing follows whatever sequence the engine runs (a pruned token is routed nowhere). The site
    ``llm.layers[i].experts`` gives each token's routed experts in a sparse layer, ``[batch, seq, top_k]`` ids as
    its router (``mlp.gate``) chose them (the shared expert, which every token passes through, is not among them);
    the dense layers refuse it, naming the sparse ones (`Adapter.expert_layers`).
    """

    architectures = ("Glm4vMoeForConditionalGeneration",)
    model_class = Glm4vMoeForConditionalGeneration
    # no post-norms: `.attn` / `.mlp` are the modules' outputs; the sparse blocks' router (dense layers have none)
    paths = replace(_QWEN_PATHS, router="mlp.gate")


__all__ = ["Glm4vAdapter", "Glm4vImageProcessor", "Glm4vMoeAdapter"]

"""Tiny models of the Qwen-VL line and the models built on its tower or processor: Qwen2-VL, Qwen2.5-VL,
Qwen3-VL (dense and mixture-of-experts), Qwen3.5, LLaVA-OneVision-1.5, and GLM-4V (dense and mixture-of-experts)."""

from __future__ import annotations

import torch
from transformers import Qwen3_5ForConditionalGeneration

from embedlens.testing.tiny._common import _NORM, _TEXT, IMAGE_SIZE, TEXT_HIDDEN, Builder, _special_ids
from embedlens.tokenizer import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tokenizer


QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
               "vision_end_token": "<|vision_end|>"}
QWEN_PATCH = 4  # 4-px patches, 2 x 2 merged: a token covers 8 x 8 pixels


def qwen_tokenizer():
    """The shared word-level tokenizer with Qwen-VL's image tokens; the chat template frames each image as
    ``<|vision_start|><|image_pad|><|vision_end|>``, as Qwen's does."""
    frame = QWEN_TOKENS["vision_start_token"] + QWEN_TOKENS["image_token"] + QWEN_TOKENS["vision_end_token"]
    return build_tokenizer(chat_template=LLAVA_CHAT_TEMPLATE.replace(IMAGE_TOKEN + "\n", frame), extra_special_tokens=QWEN_TOKENS)


def qwen_image_processor(patch_size: int = QWEN_PATCH, max_side: int = IMAGE_SIZE, min_side: int = 16, merge_size: int = 2,
                         temporal_patch_size: int = 2):
    """The PIL `Qwen2VLImageProcessorPil` (no torchvision): images resized to multiples of ``patch_size * merge_size``
    with at most ``max_side ** 2`` pixels (a 64-px square becomes 32 x 32: 8 x 8 patches, 4 x 4 tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_side * min_side, "longest_edge": max_side * max_side},
                                    patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size, **_NORM)


def qwen_ids(tok) -> dict:
    """The token ids a Qwen-VL config names, from the tokenizer."""
    return dict(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id)


def _qwen_vl(version: str) -> Builder:
    # 3 vision blocks of width 32 on 4-px patches, merged 2 x 2 into the 64-wide LLM; M-RoPE sections of the
    # 16-dim heads' 8 frequency pairs: 2 temporal, 3 height, 3 width.
    def build(seed: int):
        from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                                  Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration)

        from embedlens.adapters.qwen2_vl import Qwen2_5_VLImageProcessor, Qwen2VLImageProcessor, Qwen3VLImageProcessor

        tok = qwen_tokenizer()
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        text = dict(vocab_size=len(tok), **_TEXT, rope_parameters=rope, **_special_ids(tok))
        vision = dict(depth=3, num_heads=4, in_channels=3, patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2)
        torch.manual_seed(seed)
        if version == "2":
            config = Qwen2VLConfig(text_config=text, vision_config=dict(vision, embed_dim=32, hidden_size=TEXT_HIDDEN, mlp_ratio=2),
                                   **qwen_ids(tok))
            model, proc = Qwen2VLForConditionalGeneration(config), Qwen2VLImageProcessor
        elif version == "2.5":
            # 16-px windows: 2 x 2 tokens per window, so images of 3 x 3 tokens and more span several;
            # block 1 of 3 attends across the whole image
            vis = dict(vision, hidden_size=32, intermediate_size=64, out_hidden_size=TEXT_HIDDEN, window_size=16,
                       fullatt_block_indexes=[1])
            config = Qwen2_5_VLConfig(text_config=text, vision_config=vis, **qwen_ids(tok))
            model, proc = Qwen2_5_VLForConditionalGeneration(config), Qwen2_5_VLImageProcessor
        else:
            text3 = dict(text, head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True))
            vis = dict(vision, hidden_size=32, intermediate_size=64, out_hidden_size=TEXT_HIDDEN, num_position_embeddings=64,
                       deepstack_visual_indexes=[0, 1])
            config = Qwen3VLConfig(text_config=text3, vision_config=vis, **qwen_ids(tok))
            model, proc = Qwen3VLForConditionalGeneration(config), Qwen3VLImageProcessor
        return model.eval(), proc(qwen_image_processor(), tok, chat_template=tok.chat_template)

    return build


def _qwen3_5(seed: int):
    # Qwen3-VL's tiny tower without DeepStack on a hybrid LLM: Gated DeltaNet layers 0 and 2, full attention 1 and 3
    # (FastV's default K = 2 reads layer 1's attention); 2 key and 4 value heads of 16 dims, a 4-wide causal conv;
    # attention heads of 32 dims rotate a quarter (8 dims: 4 frequency pairs, M-RoPE sections 2, 1, 1), as the tester
    from transformers import Qwen3_5Config

    from embedlens.adapters.qwen3_5 import Qwen3_5ImageProcessor

    tok = qwen_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    text = dict(vocab_size=len(tok), **_TEXT, head_dim=32, rope_parameters=rope, **_special_ids(tok),
                layer_types=["linear_attention", "full_attention"] * 2, linear_conv_kernel_dim=4,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
    vis = dict(depth=3, num_heads=4, in_channels=3, patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2,
               hidden_size=32, intermediate_size=64, out_hidden_size=TEXT_HIDDEN, num_position_embeddings=64)
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vis, **qwen_ids(tok)))
    return model.eval(), Qwen3_5ImageProcessor(qwen_image_processor(), tok, chat_template=tok.chat_template)


def _qwen3_vl_moe(seed: int):
    # tiny:qwen3-vl's tower and DeepStack; the LLM's odd layers (decoder_sparse_step 2) route each token to 2 of 4
    # experts of width 32, the even ones keep a dense MLP
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from embedlens.adapters.qwen3_vl_moe import Qwen3VLMoeImageProcessor

    tok = qwen_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = dict(vocab_size=len(tok), **_TEXT, head_dim=16, rope_parameters=rope, **_special_ids(tok), num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=2)
    vis = dict(depth=3, num_heads=4, in_channels=3, patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2,
               hidden_size=32, intermediate_size=64, out_hidden_size=TEXT_HIDDEN, num_position_embeddings=64,
               deepstack_visual_indexes=[0, 1])
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=vis, **qwen_ids(tok)))
    return model.eval(), Qwen3VLMoeImageProcessor(qwen_image_processor(), tok, chat_template=tok.chat_template)


def _onevision1_5(seed: int):
    # LLaVA-OneVision-1.5: 3 RICE-ViT blocks of width 32 on 4-px patches (one image per temporal patch), a class
    # token per image, merged 2 x 2 into a 64-wide Qwen3 LLM with 1-D positions.
    from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration

    from embedlens.adapters.llava_onevision1_5 import OnevisionImageProcessor15

    tok = qwen_tokenizer()
    text = dict(model_type="qwen3", vocab_size=len(tok), head_dim=16, **_TEXT, **_special_ids(tok))
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=QWEN_PATCH,
                  spatial_merge_size=2, out_hidden_size=TEXT_HIDDEN)
    config = LlavaOnevision15Config(text_config=text, vision_config=vision, **qwen_ids(tok))
    torch.manual_seed(seed)
    model = LlavaOnevision15ForConditionalGeneration(config).eval()
    return model, OnevisionImageProcessor15(qwen_image_processor(temporal_patch_size=1), tok, chat_template=tok.chat_template)


GLM4V_TOKENS = {"image_token": "<|image|>", "video_token": "<|video|>", "image_start_token": "<|begin_of_image|>",
                "image_end_token": "<|end_of_image|>", "video_start_token": "<|begin_of_video|>",
                "video_end_token": "<|end_of_video|>"}


def glm4v_tokenizer():
    """The shared word-level tokenizer with GLM-4V's image and video tokens; the chat template frames each image as
    ``<|begin_of_image|><|image|><|end_of_image|>``, as GLM-4.1V's does."""
    frame = GLM4V_TOKENS["image_start_token"] + GLM4V_TOKENS["image_token"] + GLM4V_TOKENS["image_end_token"]
    return build_tokenizer(chat_template=LLAVA_CHAT_TEMPLATE.replace(IMAGE_TOKEN + "\n", frame), extra_special_tokens=GLM4V_TOKENS)


def glm4v_image_processor(patch_size: int = QWEN_PATCH, max_side: int = IMAGE_SIZE, min_side: int = 16, merge_size: int = 2):
    """The PIL `Glm4vImageProcessorPil` (no torchvision): sides rounded to multiples of ``patch_size * merge_size``,
    two temporal copies of the image at most ``max_side ** 2`` pixels each (a 64-px square becomes 32 x 32)."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    return Glm4vImageProcessorPil(size={"shortest_edge": 2 * min_side * min_side, "longest_edge": 2 * max_side * max_side},
                                  patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2, **_NORM)


def glm4v_ids(tok) -> dict:
    """The token ids a GLM-4V config names, from the tokenizer."""
    return dict(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                image_start_token_id=tok.image_start_token_id, image_end_token_id=tok.image_end_token_id,
                video_start_token_id=tok.video_start_token_id, video_end_token_id=tok.video_end_token_id)


def _glm4v(seed: int):
    # GLM-4V: 3 blocks of width 32 on 4-px patches, merged 2 x 2 by the tower's strided convolution into the
    # 64-wide LLM (sandwich-normed decoder layers); heads of 16 dims rotate half (4 pairs: M-RoPE sections 2, 1, 1)
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    from embedlens.adapters.glm4v import Glm4vImageProcessor

    tok = glm4v_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}
    text = dict(vocab_size=len(tok), **_TEXT, rope_parameters=rope, **_special_ids(tok))
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, image_size=IMAGE_SIZE,
                  patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=TEXT_HIDDEN)
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(Glm4vConfig(text_config=text, vision_config=vision, **glm4v_ids(tok))).eval()
    return model, Glm4vImageProcessor(glm4v_image_processor(), tok, chat_template=tok.chat_template)


def _glm4v_moe(seed: int):
    # GLM-4.5V: tiny:glm4v's tower on a mixture-of-experts LM: layer 0 dense (first_k_dense_replace 1), layers 1-3
    # route each token to 2 of 4 experts of width 32 (2 groups, the best one kept) plus a shared expert
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    from embedlens.adapters.glm4v import Glm4vImageProcessor

    tok = glm4v_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}
    text = dict(vocab_size=len(tok), **_TEXT, rope_parameters=rope, **_special_ids(tok), n_routed_experts=4,
                num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32, n_group=2, topk_group=1,
                first_k_dense_replace=1)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, image_size=IMAGE_SIZE,
                  patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=TEXT_HIDDEN)
    torch.manual_seed(seed)
    model = Glm4vMoeForConditionalGeneration(Glm4vMoeConfig(text_config=text, vision_config=vision, **glm4v_ids(tok))).eval()
    return model, Glm4vImageProcessor(glm4v_image_processor(), tok, chat_template=tok.chat_template)

"""Tester configurations of the families with Qwen-VL's packed towers and M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL
(and its mixture-of-experts LM), Qwen3.5, LLaVA-OneVision-1.5, GLM-4V (and GLM-4.5V's mixture-of-experts LM).

The values are the testers' (transformers ``tests/models/*/test_modeling_*.py``). Keys the testers
pass that the config classes do not read (seq_length, is_training, use_labels, dropout probabilities,
num_labels, ...) are left out; they change nothing in the model. Only the vocabulary is ours.
"""

from __future__ import annotations

import torch

from tests.support.hf_testers._common import Builder, _ids


#: `Qwen2VLVisionText2TextModelTester` (tests/models/qwen2_vl/test_modeling_qwen2_vl.py); its
#: ``rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}`` is transformers 5's ``rope_parameters``.
QWEN2_VL_TESTER = dict(
    text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              hidden_act="silu", max_position_embeddings=512, max_window_layers=3, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
    vision=dict(depth=2, embed_dim=32, hidden_act="quick_gelu", hidden_size=32, mlp_ratio=4, num_heads=4, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2),
    image_size=28,
)


#: `Qwen2_5_VLVisionText2TextModelTester` (tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py): no merge
#: (``spatial_merge_size=1``), default 112-px windows, no full-attention block within its 2 blocks.
QWEN2_5_VL_TESTER = dict(
    text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              hidden_act="silu", max_position_embeddings=512, max_window_layers=3, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
    vision=dict(depth=2, in_chans=3, hidden_act="silu", intermediate_size=32, out_hidden_size=32, hidden_size=32, num_heads=4,
                patch_size=14, spatial_patch_size=14, spatial_merge_size=1, temporal_patch_size=2),
    image_size=14,
)


#: `Qwen3VLVisionText2TextModelTester` (tests/models/qwen3_vl/test_modeling_qwen3_vl.py, a `VLMModelTester`): its own
#: values, and the text sizes of the VLM tester base (hidden 32, MLP 37, 2 layers; out_hidden_size and the
#: vision widths follow hidden_size). Patches of 16 px, no merge, DeepStack after vision blocks 0 and 1.
QWEN3_VL_TESTER = dict(
    text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, hidden_act="silu", max_position_embeddings=512, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "mrope_section": [16, 8, 8], "mrope_interleaved": True,
                               "rope_theta": 10000.0}),
    vision=dict(depth=2, hidden_act="gelu_pytorch_tanh", num_heads=4, patch_size=16, spatial_merge_size=1, temporal_patch_size=2,
                num_position_embeddings=16, deepstack_visual_indexes=[0, 1], hidden_size=32, intermediate_size=32,
                out_hidden_size=32),
    image_size=16,
)


#: `Qwen3VLMoeVisionText2TextModelTester` (tests/models/qwen3_vl_moe/test_modeling_qwen3_vl_moe.py, a `VLMModelTester`):
#: Qwen3-VL's tester values, every LLM layer a sparse block routing each token to 4 of 8 experts of width 16.
QWEN3_VL_MOE_TESTER = dict(QWEN3_VL_TESTER, text=dict(QWEN3_VL_TESTER["text"], moe_intermediate_size=16, num_experts_per_tok=4,
                                                      num_experts=8, decoder_sparse_step=1))


#: `Qwen3_5VisionText2TextModelTester` (tests/models/qwen3_5/test_modeling_qwen3_5.py): Qwen3-VL's tower without
#: DeepStack (16-px patches, no merge) on a hybrid LM of one full-attention layer then one Gated DeltaNet layer
#: (2-wide causal conv, 4 key / 8 value heads of 16 dims); gated attention heads of 32 dims rotating a quarter.
QWEN3_5_TESTER = dict(
    text=dict(hidden_act="silu", head_dim=32, hidden_size=32, intermediate_size=37, max_position_embeddings=512,
              num_attention_heads=4, num_hidden_layers=2, layer_types=["full_attention", "linear_attention"],
              num_key_value_heads=2, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 10000, "mrope_section": [2, 1, 1], "mrope_interleaved": True},
              linear_conv_kernel_dim=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=4,
              linear_num_value_heads=8),
    vision=dict(depth=2, in_chans=3, hidden_act="gelu_pytorch_tanh", intermediate_size=32, out_hidden_size=32, hidden_size=32,
                num_heads=4, patch_size=16, spatial_merge_size=1, temporal_patch_size=2, num_position_embeddings=16),
    image_size=16,
)


#: The released models' pattern on the tester's sizes: three Gated DeltaNet layers, then full attention.
QWEN3_5_3TO1_TESTER = dict(QWEN3_5_TESTER, text=dict(QWEN3_5_TESTER["text"], num_hidden_layers=4,
                                                      layer_types=["linear_attention"] * 3 + ["full_attention"]))


def qwen_vl_builder(version: str) -> Builder:
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5 from its tester: 14-px patches merged 2 x 2 (Qwen2-VL), 14-px
    patches unmerged (Qwen2.5-VL), 16-px patches unmerged with DeepStack (Qwen3-VL, ``3``; on a mixture-of-experts LM, ``3-moe``) or without it on a hybrid
    Gated DeltaNet LM (Qwen3.5, ``3.5``; ``3.5-3to1`` with the released models' layer pattern); the image processor
    keeps images up to 3 x 3 tester images."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen3VLConfig, Qwen3VLForConditionalGeneration)

    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from embedlens.adapters.qwen2_vl import Qwen2_5_VLImageProcessor, Qwen2VLImageProcessor, Qwen3VLImageProcessor
    from embedlens.adapters.qwen3_5 import Qwen3_5ImageProcessor
    from embedlens.adapters.qwen3_vl_moe import Qwen3VLMoeImageProcessor
    from embedlens.testing.tiny import qwen_ids, qwen_image_processor, qwen_tokenizer

    t, config_cls, model_cls, proc_cls = {
        "2": (QWEN2_VL_TESTER, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor),
        "2.5": (QWEN2_5_VL_TESTER, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLImageProcessor),
        "3": (QWEN3_VL_TESTER, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLImageProcessor),
        "3-moe": (QWEN3_VL_MOE_TESTER, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeImageProcessor),
        "3.5": (QWEN3_5_TESTER, Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5ImageProcessor),
        "3.5-3to1": (QWEN3_5_3TO1_TESTER, Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5ImageProcessor),
    }[version]

    def build(seed: int):
        tok = qwen_tokenizer()
        v = t["vision"]
        config = config_cls(text_config=dict(t["text"], vocab_size=len(tok), **_ids(tok)), vision_config=v, **qwen_ids(tok))
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        ip = qwen_image_processor(patch_size=v["patch_size"], merge_size=v["spatial_merge_size"], max_side=3 * t["image_size"],
                                  min_side=t["image_size"])
        return model, proc_cls(ip, tok, chat_template=tok.chat_template)

    return build


#: `LlavaOnevisionVision1_5Text2TextModelTester` (tests/models/llava_onevision1_5/test_modeling_llava_onevision1_5.py).
#: Its configs are the 4B checkpoint's (a 36-layer Qwen3 of width 4096, a 24-block RICE-ViT of width 1024): here
#: the widths and depths are cut (text 64 wide, 2 layers; tower 64 wide, 2 blocks) and every other value kept:
#: 14-px patches, ``spatial_merge_size=1`` (one token per patch), ``temporal_patch_size=1``, GQA at the tester's
#: 4 : 1 query : key-value heads, an MLP 3x (text) and 4x (tower) wide, gelu/silu, its norms' epsilons and
#: ``rope_theta=1e6``. The ``-merge`` variant merges 2 x 2, as the released checkpoints do.
ONEVISION1_5_TESTER = dict(
    text=dict(model_type="qwen3", hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=1,
              intermediate_size=192, num_hidden_layers=2, hidden_act="silu", attention_bias=False, rms_norm_eps=1e-06,
              max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
              use_sliding_window=False, sliding_window=None, tie_word_embeddings=False),
    vision=dict(depth=2, hidden_size=64, intermediate_size=256, num_heads=4, hidden_act="gelu", in_channels=3,
                layer_norm_eps=1e-05, patch_size=14, spatial_merge_size=1, out_hidden_size=64),
    image_size=14,
)


def onevision1_5_builder(merge: int = 1) -> Builder:
    """LLaVA-OneVision-1.5 from its tester's values (above), merging ``merge x merge`` patches per token; the image
    processor keeps images up to 3 x 3 tester images (one temporal patch each)."""
    from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration

    from embedlens.adapters.llava_onevision1_5 import OnevisionImageProcessor15
    from embedlens.testing.tiny import qwen_ids, qwen_image_processor, qwen_tokenizer

    t = ONEVISION1_5_TESTER

    def build(seed: int):
        tok = qwen_tokenizer()
        v = dict(t["vision"], spatial_merge_size=merge)
        config = LlavaOnevision15Config(text_config=dict(t["text"], vocab_size=len(tok), **_ids(tok)), vision_config=v,
                                        **qwen_ids(tok))
        torch.manual_seed(seed)
        model = LlavaOnevision15ForConditionalGeneration(config).eval()
        ip = qwen_image_processor(patch_size=v["patch_size"], merge_size=merge, max_side=3 * t["image_size"] * merge,
                                  min_side=t["image_size"] * merge, temporal_patch_size=1)
        return model, OnevisionImageProcessor15(ip, tok, chat_template=tok.chat_template)

    return build


#: `Glm4vVisionText2TextModelTester` (tests/models/glm4v/test_modeling_glm4v.py): a text model 16 wide (2 heads of 8
#: dims, 1 key-value head, M-RoPE sections 2, 1, 1 over half of each head), a tower 48 wide on 14-px patches with
#: ``spatial_merge_size=1`` (its downsampling convolution maps each patch to one token). The tester's 112-px images
#: give 8 x 8 tokens; here the processor keeps images up to 84 x 84 px. Its ``output_channels`` and ``rope_theta``
#: outside ``rope_parameters`` are read by nothing (the rope's theta is the config's default 10000, as written). The
#: ``-merge`` variant merges 2 x 2, as the released checkpoints do.
GLM4V_TESTER = dict(
    text=dict(hidden_size=16, intermediate_size=22, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              hidden_act="silu", max_position_embeddings=512, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000}),
    vision=dict(depth=2, hidden_act="silu", hidden_size=48, out_hidden_size=16, intermediate_size=22, patch_size=14,
                spatial_merge_size=1, temporal_patch_size=2),
    image_size=28,
)


#: `Glm4vMoeVisionText2TextModelTester` (tests/models/glm4v_moe/test_modeling_glm4v_moe.py): GLM-4V's tester values on
#: a mixture-of-experts LM: layer 0 dense (``first_k_dense_replace`` 1), layer 1 routing each token to all 8 routed
#: experts (one group) plus a shared one; M-RoPE sections 1, 1 (its ``rope_scaling``) over the default half of each
#: head; the experts keep the config's default width (``moe_intermediate_size`` 1408).
GLM4V_MOE_TESTER = dict(GLM4V_TESTER, text=dict(
    GLM4V_TESTER["text"], rope_parameters={"rope_type": "default", "mrope_section": [1, 1], "rope_theta": 10000},
    n_routed_experts=8, n_shared_experts=1, n_group=1, topk_group=1, num_experts_per_tok=8))


def glm4v_builder(merge: int = 1, moe: bool = False) -> Builder:
    """GLM-4V (``moe``: GLM-4.5V's mixture-of-experts LM) from its tester's values (above), merging ``merge x merge``
    patches per token; the image processor keeps images up to 3 x 3 blocks of ``image_size`` px (two temporal copies
    of each image count against it)."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    from embedlens.adapters.glm4v import Glm4vImageProcessor
    from embedlens.testing.tiny import glm4v_ids, glm4v_image_processor, glm4v_tokenizer

    t = GLM4V_MOE_TESTER if moe else GLM4V_TESTER
    config_cls, model_cls = (Glm4vMoeConfig, Glm4vMoeForConditionalGeneration) if moe else (Glm4vConfig, Glm4vForConditionalGeneration)

    def build(seed: int):
        tok = glm4v_tokenizer()
        v = dict(t["vision"], spatial_merge_size=merge)
        config = config_cls(text_config=dict(t["text"], vocab_size=len(tok), **_ids(tok)), vision_config=v, **glm4v_ids(tok))
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        ip = glm4v_image_processor(patch_size=v["patch_size"], merge_size=merge, max_side=3 * t["image_size"] * merge,
                                   min_side=v["patch_size"] * merge)
        return model, Glm4vImageProcessor(ip, tok, chat_template=tok.chat_template)

    return build

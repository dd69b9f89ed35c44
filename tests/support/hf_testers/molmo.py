"""Tester configuration of Molmo2: overlapping crops plus a low-res view, patches pooled by attention (possibly
across crops), image features added to the image tokens' embeddings.

The values are `Molmo2VisionText2TextModelTester.get_config`'s (transformers
``tests/models/molmo2/test_modeling_molmo2.py``); transformers 5.25 builds and runs them unchanged. Only the
vocabulary is ours (``vocab_size``, the special-token ids, and ``image_start_token_id`` / ``image_end_token_id`` /
``image_patch_id``, which the tester sets to 3 / 4 / 5 of its own 99-token vocabulary). The tester feeds the model
tensors it builds itself; the processor here is HF's rule (`embedlens.adapters.molmo2_crops`) with
`Molmo2ImageProcessor`'s defaults (up to 8 crops of 378 px, margins of 4 patches, 2 x 2 pooling), the tower's
``image_size`` and ``patch_size`` being the tester's.
"""

from __future__ import annotations

import torch

from tests.support.hf_testers._common import Builder, _ids

#: `Molmo2VisionText2TextModelTester`: a 2-layer Qwen3-style text model of width 32 (head_dim 128), a 2-layer tower
#: of width 32 on 378-px crops of 14-px patches (27 x 27), the adapter pooling from its last layer
MOLMO2_TESTER = dict(
    text=dict(hidden_act="silu", head_dim=128, hidden_size=32, intermediate_size=37, max_position_embeddings=512,
              num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6),
    vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                head_dim=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, image_size=[378, 378], patch_size=14,
                attention_dropout=0.0),
    adapter=dict(vision_feature_layer=[1], hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                 intermediate_size=37, text_hidden_size=32, hidden_act="silu"),
)


def molmo2_builder() -> Builder:
    """Molmo2 from its tester, with HF's image processor defaults."""
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration

    from embedlens.testing.tiny import molmo2_processor, molmo2_tokenizer

    t = MOLMO2_TESTER

    def build(seed: int):
        tok = molmo2_tokenizer()
        config = Molmo2Config(text_config=dict(t["text"], vocab_size=len(tok), **_ids(tok)), vision_config=t["vision"],
                              adapter_config=t["adapter"], image_start_token_id=tok.convert_tokens_to_ids("<im_start>"),
                              image_end_token_id=tok.convert_tokens_to_ids("<im_end>"),
                              image_patch_id=tok.convert_tokens_to_ids("<im_patch>"))
        torch.manual_seed(seed)
        model = Molmo2ForConditionalGeneration(config).eval()
        return model, molmo2_processor(tok, crop=378, patch_size=14, max_crops=8, overlap_margins=(4, 4))

    return build

"""Tester configurations of the families that cut an image into tiles plus a global view and shrink each tile's
patches by pixel shuffle: Idefics3 and SmolVLM, InternVL, Llama 4.

The values are the testers' (transformers ``tests/models/*/test_modeling_*.py``). Keys the testers
pass that the config classes do not read (seq_length, is_training, use_labels, dropout probabilities,
num_labels, ...) are left out; they change nothing in the model. Only the vocabulary is ours.
"""

from __future__ import annotations

import torch

from embedlens.tokenizer import build_tokenizer
from tests.support.hf_testers._common import Builder, _ids


#: `Idefics3VisionText2TextModelTester` and `SmolVLMVisionText2TextModelTester` (same values). Their text config is a
#: `LlamaConfig` carrying ``sliding_window=32``, which `LlamaModel` ignores (full attention): the engine must too.
IDEFICS3_TESTER = dict(
    text=dict(hidden_size=64, intermediate_size=56, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
              hidden_act="silu", max_position_embeddings=256, initializer_range=0.02, rms_norm_eps=1e-6,
              tie_word_embeddings=False, rope_theta=10000.0, attention_dropout=0.0, sliding_window=32),
    vision=dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                dropout=0.1, attention_dropout=0.1, initializer_range=0.02),
    top=dict(use_cache=False, tie_word_embeddings=False, scale_factor=2),
)


def idefics3_builder(smolvlm: bool = False) -> Builder:
    """Idefics3 (or SmolVLM) from its tester: 16-px sub-images of 4-px patches, pixel shuffle 2; images cut at 32 px."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from embedlens.adapters.idefics3 import FAKE_TOKEN, GLOBAL_TAG, SmolVLMImageProcessor, row_col_tag

    t = IDEFICS3_TESTER

    def build(seed: int):
        tok = build_tokenizer()
        markers = [FAKE_TOKEN, GLOBAL_TAG, "<end_of_utterance>"] + [row_col_tag(i, j) for i in range(6) for j in range(6)]
        tok.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
        size = t["vision"]["image_size"]
        ip = dict(size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size}, do_image_splitting=True)
        seq = (size // t["vision"]["patch_size"] // t["top"]["scale_factor"]) ** 2
        cfg = dict(image_token_id=tok.image_token_id, vision_config=t["vision"], text_config=dict(t["text"], vocab_size=len(tok), **_ids(tok)), **t["top"])
        torch.manual_seed(seed)
        if smolvlm:
            model = SmolVLMForConditionalGeneration(SmolVLMConfig(**cfg)).eval()
            processor = SmolVLMImageProcessor(SmolVLMImageProcessorPil(**ip), tok, image_seq_len=seq, chat_template=tok.chat_template)
        else:
            model = Idefics3ForConditionalGeneration(Idefics3Config(**cfg)).eval()
            processor = Idefics3Processor(Idefics3ImageProcessorPil(**ip), tok, image_seq_len=seq, chat_template=tok.chat_template)
        return model, processor

    return build


#: `InternVLVisionText2TextModelTester` (tests/models/internvl/test_modeling_internvl.py).
INTERNVL_TESTER = dict(
    text=dict(model_type="qwen2", hidden_size=128, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, hidden_act="silu", max_position_embeddings=512, rope_theta=10000, tie_word_embeddings=True),
    vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=64, patch_size=4,
                num_channels=3, hidden_act="quick_gelu", use_absolute_position_embeddings=True),
    top=dict(image_seq_length=64, vision_feature_layer=-1),
)


def internvl_builder() -> Builder:
    """InternVL from its tester: 64-px tiles of 4-px patches (+ CLS), pixel shuffle 0.5; up to 4 tiles + thumbnail."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from embedlens.adapters.internvl import InternVLImageProcessor
    from embedlens.tokenizer import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE
    from embedlens.testing.tiny import INTERNVL_TOKENS

    t = INTERNVL_TESTER

    def build(seed: int):
        tok = build_tokenizer(chat_template=LLAVA_CHAT_TEMPLATE.replace(IMAGE_TOKEN, INTERNVL_TOKENS["context_image_token"]),
                              extra_special_tokens=INTERNVL_TOKENS)
        config = InternVLConfig(text_config=dict(t["text"], vocab_size=len(tok), **_ids(tok)), vision_config=t["vision"],
                                image_token_id=tok.context_image_token_id, **t["top"], **_ids(tok))
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config).eval()
        size = t["vision"]["image_size"]
        ip = GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=True, min_patches=1, max_patches=4)
        return model, InternVLImageProcessor(ip, tok, image_seq_length=t["top"]["image_seq_length"], chat_template=tok.chat_template)

    return build


#: `Llama4ForVisionText2TextModelTester` (tests/models/llama4/test_modeling_llama4.py): a 2-layer Llama 4 text model
#: of width 32 with 40 heads (Llama4TextConfig's head_dim 128 and 8 key/value heads), both layers mixture-of-experts
#: (its defaults: 16 experts, top 1, a shared expert) with rotary chunked attention in chunks of 8192 (no NoPE layer in
#: 2), and a 2-layer tower on 8-px tiles of 2-px patches, pixel-shuffled 2 x 2: 4 tokens a tile. The tester feeds
#: one tile per image; the processor here cuts images into up to ``max_patches`` (its default, 16) tiles + the global.
LLAMA4_TESTER = dict(
    text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=40, intermediate_size=128, hidden_act="gelu",
              max_position_embeddings=512, initializer_range=0.02),
    vision=dict(vision_output_dim=32, hidden_size=32, image_size=8, patch_size=2, num_channels=3, projection_dim=32,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, attention_dropout=0.1,
                initializer_range=0.02, pixel_shuffle_ratio=0.5, projector_input_dim=32, projector_output_dim=32),
)


def llama4_builder(chunk: int | None = None) -> Builder:
    """Llama 4 from its tester.

    Args:
        chunk: replaces the tester's ``attention_chunk_size`` (8192) so that chunks bite on the test prompts; the
            last layer is then a NoPE layer of full attention, as every 4th layer of the released models.
    """
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from embedlens.testing.tiny import llama4_processor, llama4_tokenizer

    t = LLAMA4_TESTER

    def build(seed: int):
        tok = llama4_tokenizer()
        text = dict(t["text"], vocab_size=len(tok), **_ids(tok))
        if chunk is not None:
            text.update(attention_chunk_size=chunk, no_rope_layers=[1, 0])
        config = Llama4Config(text_config=text, vision_config=t["vision"], image_token_index=tok.patch_token_id,
                              boi_token_index=tok.start_of_image_token_id, eoi_token_index=tok.end_of_image_token_id)
        torch.manual_seed(seed)
        model = Llama4ForConditionalGeneration(config).eval()
        processor = llama4_processor(tok, tile=t["vision"]["image_size"], patch_size=t["vision"]["patch_size"], max_patches=16)
        return model, processor

    return build

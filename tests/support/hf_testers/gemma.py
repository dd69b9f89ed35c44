"""The Gemma line's tester configurations: PaliGemma and PaliGemma2, Gemma 3, Gemma 4.

The values are the testers' (transformers ``tests/models/*/test_modeling_*.py``). Keys the testers
pass that the config classes do not read (seq_length, is_training, use_labels, dropout probabilities,
num_labels, ...) are left out; they change nothing in the model. Only the vocabulary is ours.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipVisionConfig,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from embedlens.tokenizer import build_tokenizer
from tests.support.hf_testers._common import _NORM, Builder, _ids


#: `PaliGemmaVisionText2TextModelTester` (tests/models/paligemma/test_modeling_paligemma.py); the
#: PaliGemma2 tester (tests/models/paligemma2/test_modeling_paligemma2.py) is the same with
#: ``model_type: gemma2``.
PALIGEMMA_TESTER = dict(
    text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
              intermediate_size=37, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=512,
              initializer_range=0.02),
    # `num_image_tokens: 4` is what the tester writes; the model has (20 // 5) ** 2 = 16 patches and ignores it.
    vision=dict(image_size=20, patch_size=5, num_image_tokens=4, num_channels=3, hidden_size=32, projection_dim=32,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, dropout=0.1, attention_dropout=0.1,
                initializer_range=0.02),
    # PaliGemmaModel ignores vision_feature_select_strategy: it keeps every SigLIP patch.
    top=dict(projector_hidden_act="gelu", projection_dim=32, vision_feature_select_strategy="default",
             vision_feature_layer=-1),
)


def paligemma_builder(text_model_type: str = "gemma", full_attention_only: bool = False, sliding_window: int | None = None) -> Builder:
    """A PaliGemma (``gemma``) or PaliGemma2 (``gemma2``, final-logit softcapping) on the testers' values.

    Args:
        text_model_type: "gemma" or "gemma2".
        full_attention_only: give Gemma2 full attention in every layer instead of its
            alternating sliding-window layers.
        sliding_window: Gemma2's window instead of its default (4096), so that it bites on short prompts.
    """
    t = PALIGEMMA_TESTER
    text_cls = {"gemma": GemmaConfig, "gemma2": Gemma2Config}[text_model_type]
    extra = {"layer_types": ["full_attention"] * t["text"]["num_hidden_layers"]} if full_attention_only else {}
    if sliding_window is not None:
        extra["sliding_window"] = sliding_window

    def build(seed: int):
        tok = build_tokenizer(chat_template=None)
        vision = SiglipVisionConfig(**t["vision"])
        image_processor = SiglipImageProcessorPil(size={"height": vision.image_size, "width": vision.image_size}, **_NORM)
        image_processor.image_seq_length = (vision.image_size // vision.patch_size) ** 2
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # adds PaliGemma's extra tokens
        tok = processor.tokenizer
        config = PaliGemmaConfig(
            vision_config=vision,
            text_config=text_cls(vocab_size=len(tok), **t["text"], **extra, **_ids(tok)),
            image_token_id=tok.image_token_id,
            **t["top"],
        )
        torch.manual_seed(seed)
        model = PaliGemmaForConditionalGeneration(config).eval()
        return model, processor

    return build


#: `Gemma3Vision2TextModelTester` (tests/models/gemma3/test_modeling_gemma3.py); its text config is
#: `Gemma3ModelTester.get_config()`, i.e. `CausalLMModelTester`'s defaults on `Gemma3TextConfig` (2 layers, both
#: sliding with Gemma3TextConfig's default window 4096 and pattern 6; head_dim = 32 // 2; untied embeddings).
#: ``mm_tokens_per_image=2`` is not a square: the projector pools the 4 x 4 patches with kernel 4 // int(sqrt(2)) = 4
#: to one token per image, and the tester's prompts hold one image token, as here.
GEMMA3_TESTER = dict(
    text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=37,
              max_position_embeddings=512, initializer_range=0.02, head_dim=16, tie_word_embeddings=False),
    vision=dict(image_size=20, patch_size=5, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, dropout=0.1, attention_dropout=0.1, initializer_range=0.02),
    top=dict(mm_tokens_per_image=2),
)


def gemma3_builder(sliding_window: int | None = None) -> Builder:
    """Gemma 3 from its tester: 20-px SigLIP images of 5-px patches, average-pooled to one token per image.

    Args:
        sliding_window: replaces the default window (4096) so that it bites on the test prompts.
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from embedlens.tokenizer import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE
    from embedlens.testing.tiny import GEMMA3_TOKENS

    t = GEMMA3_TESTER

    def build(seed: int):
        tok = build_tokenizer(chat_template=LLAVA_CHAT_TEMPLATE.replace(IMAGE_TOKEN, GEMMA3_TOKENS["boi_token"]),
                              extra_special_tokens=GEMMA3_TOKENS)
        window = {} if sliding_window is None else {"sliding_window": sliding_window}
        text = Gemma3TextConfig(vocab_size=len(tok), **t["text"], **window, **_ids(tok))
        config = Gemma3Config(text_config=text, vision_config=SiglipVisionConfig(**t["vision"]), image_token_index=tok.image_token_id,
                              boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id, **t["top"])
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config).eval()
        with torch.no_grad():  # initialised to zeros (a checkpoint fills it): give the image tokens content
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
        size = t["vision"]["image_size"]
        side = (size // t["vision"]["patch_size"]) // ((size // t["vision"]["patch_size"]) // int(t["top"]["mm_tokens_per_image"] ** 0.5))
        ip = Gemma3ImageProcessorPil(size={"height": size, "width": size}, **_NORM)
        return model, Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=side * side, chat_template=tok.chat_template)

    return build


#: `Gemma4Vision2TextModelTester` (tests/models/gemma4/test_modeling_gemma4.py): its vision values (5-px patches,
#: pooled 2 x 2 as its ``prepare_config_and_inputs`` sets) and `Gemma4TextModelTester`'s text model, which switches on
#: everything Gemma 4's LM has: 4 layers sliding / global, the last 2 reusing the earlier layers' keys and values,
#: per-layer inputs of width 16, mixture-of-experts blocks (8 experts, top 2), images bidirectional on sliding layers
#: (`CausalLMModelTester`'s defaults otherwise: width 32, 2 heads of 16, MLP 37). ``vocab_size_per_layer_input``
#: follows our vocabulary (the tester's 99 is its vocabulary size). The tester feeds 20-px images, 4 tokens each;
#: the processor's smallest setting is 70 tokens, so images here are resized to at most 70 tokens.
GEMMA4_TESTER = dict(
    text=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, intermediate_size=37,
              max_position_embeddings=512, initializer_range=0.02, head_dim=16, global_head_dim=16, num_kv_shared_layers=2,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
              hidden_size_per_layer_input=16, enable_moe_block=True, moe_intermediate_size=16, top_k_experts=2, num_experts=8,
              use_bidirectional_attention="vision"),
    vision=dict(patch_size=5, num_channels=3, hidden_size=32, num_key_value_heads=1, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, attention_dropout=0.1, initializer_range=0.02, pooling_kernel_size=2),
    max_soft_tokens=70,
)


def gemma4_builder(sliding_window: int | None = None) -> Builder:
    """Gemma 4 from its testers.

    Args:
        sliding_window: replaces Gemma4TextConfig's default window (longer than the test prompts) so that it bites.
    """
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from embedlens.testing.tiny import gemma4_ids, gemma4_processor, gemma4_tokenizer

    t = GEMMA4_TESTER

    def build(seed: int):
        tok = gemma4_tokenizer()
        text = dict(t["text"], vocab_size=len(tok), vocab_size_per_layer_input=len(tok), **_ids(tok))
        if sliding_window is not None:
            text["sliding_window"] = sliding_window
        config = Gemma4Config(text_config=text, vision_config=t["vision"], audio_config=None, **gemma4_ids(tok))
        torch.manual_seed(seed)
        model = Gemma4ForConditionalGeneration(config).eval()
        processor = gemma4_processor(tok, patch_size=t["vision"]["patch_size"], pool=t["vision"]["pooling_kernel_size"],
                                     max_soft_tokens=t["max_soft_tokens"])
        return model, processor

    return build

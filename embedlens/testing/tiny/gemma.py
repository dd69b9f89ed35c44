"""Tiny models of the Gemma line: PaliGemma, Gemma 3 and Gemma 4 (with Gemma 4's tokenizer and processor)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from embedlens.testing.tiny._common import _NORM, _TEXT, _VISION, GRID, IMAGE_SIZE, TEXT_HIDDEN, _special_ids
from embedlens.tokenizer import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tokenizer


def _paligemma(seed: int):
    tok = build_tokenizer(chat_template=None)
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **_NORM)
    image_processor.image_seq_length = GRID * GRID
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # adds PaliGemma's extra tokens
    tok = processor.tokenizer
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**_VISION, projection_dim=TEXT_HIDDEN),
        text_config=GemmaConfig(vocab_size=len(tok), head_dim=16, **_TEXT, **_special_ids(tok)),
        image_token_id=tok.image_token_id,
        projection_dim=TEXT_HIDDEN,
        hidden_size=TEXT_HIDDEN,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    return model, processor


GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}


def _gemma3(seed: int):
    # 32-px images in 8 x 8 patches of 4, pooled 2 x 2 to 4 x 4 = 16 tokens. Sliding layers (window 8, shorter than
    # every prompt and than an image's 16 tokens) alternate with global ones. The config sets final-logit and attention
    # softcapping, which Gemma3ForConditionalGeneration both ignores: embedlens must follow the model, not the config.
    tok = build_tokenizer(chat_template=LLAVA_CHAT_TEMPLATE.replace(IMAGE_TOKEN, GEMMA3_TOKENS["boi_token"]),
                          extra_special_tokens=GEMMA3_TOKENS)
    vision = SiglipVisionConfig(**{**_VISION, "patch_size": 4})
    text = Gemma3TextConfig(vocab_size=len(tok), head_dim=16, sliding_window=8, final_logit_softcapping=30.0,
                            attn_logit_softcapping=5.0, layer_types=["sliding_attention", "full_attention"] * (_TEXT["num_hidden_layers"] // 2),
                            **_TEXT, **_special_ids(tok))
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=GRID * GRID,
                          image_token_index=tok.image_token_id, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF initialises the projection to zeros (a checkpoint fills it); give it weights to carry
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **_NORM)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=GRID * GRID, chat_template=tok.chat_template)
    return model, processor


GEMMA4_TOKENS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                 # never written (images only), but the model embeds their ids to find video and audio placeholders
                 "video_token": "<|video|>", "audio_token": "<|audio|>"}


def gemma4_tokenizer():
    """The shared word-level tokenizer with Gemma 4's image token and its begin/end markers; the chat template
    writes ``<|image|>`` for each image, which the processor expands."""
    return build_tokenizer(chat_template=LLAVA_CHAT_TEMPLATE.replace(IMAGE_TOKEN, GEMMA4_TOKENS["image_token"]),
                           extra_special_tokens=GEMMA4_TOKENS)


def gemma4_ids(tok) -> dict[str, int]:
    """Gemma4Config's token ids from the tokenizer (its defaults are ids of Gemma 4's own vocabulary)."""
    return dict(image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id, eoi_token_id=tok.eoi_token_id,
                video_token_id=tok.video_token_id, audio_token_id=tok.audio_token_id)


def gemma4_processor(tok, patch_size: int = 4, pool: int = 2, max_soft_tokens: int = 70):
    """`Gemma4ImageProcessor` (images and text only) with the PIL image processor: images resized to at most
    ``max_soft_tokens`` tokens of ``pool x pool`` patches (70, its smallest setting)."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from embedlens.adapters.gemma4 import Gemma4ImageProcessor

    ip = Gemma4ImageProcessorPil(patch_size=patch_size, max_soft_tokens=max_soft_tokens, pooling_kernel_size=pool)
    return Gemma4ImageProcessor(ip, tok, chat_template=tok.chat_template, image_seq_length=max_soft_tokens)


def _gemma4(seed: int):
    # Gemma 4's encoder (3 layers of width 32 on 4-px patches, 2-D RoPE, pooled 2 x 2) and LM: sliding layers (window
    # 8, shorter than every image's tokens) alternate with global ones, images bidirectional on sliding layers only,
    # mixture-of-experts blocks (4 experts, top 2) beside each MLP, final-logit softcapping. No per-layer inputs and
    # no shared key/values (Gemma 4's larger checkpoints have neither); the HF tester configuration in
    # tests/support/hf_testers/ has both.
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    tok = gemma4_tokenizer()
    text = dict(vocab_size=len(tok), head_dim=16, global_head_dim=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"] * (_TEXT["num_hidden_layers"] // 2),
                enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32, use_bidirectional_attention="vision",
                hidden_size_per_layer_input=0, num_kv_shared_layers=0, final_logit_softcapping=30.0,
                **{k: v for k, v in _TEXT.items() if k != "max_position_embeddings"}, **_special_ids(tok))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, patch_size=4,
                  pooling_kernel_size=2)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, **gemma4_ids(tok))
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # HF initialises the patch position table to ones (a checkpoint fills it): one constant vector in every patch,
        # which after the pooler's and the projector's norms leaves all tokens alike; give it a position's worth
        model.model.vision_tower.patch_embedder.position_embedding_table.normal_(std=0.02)
        model.model.embed_vision.embedding_projection.weight.normal_(std=0.5)  # as Gemma 3's: weights to carry
    return model, gemma4_processor(tok)

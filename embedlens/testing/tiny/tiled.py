"""Tiny models of the families that cut an image into tiles: Idefics3 and SmolVLM, InternVL, and Llama 4
(with Llama 4's tokenizer and processor)."""

from __future__ import annotations

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    Qwen2Config,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from embedlens.adapters.idefics3 import FAKE_TOKEN, GLOBAL_TAG, SmolVLMImageProcessor, row_col_tag
from embedlens.adapters.internvl import InternVLImageProcessor
from embedlens.testing.tiny._common import _NORM, _TEXT, IMAGE_SIZE, Builder, _special_ids
from embedlens.tokenizer import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tokenizer


def _idefics3_family(smolvlm: bool) -> Builder:
    # Sub-images of 32 x 32 pixels in 8 x 8 patches of 4; the pixel shuffle folds 2 x 2 patch
    # blocks, so each sub-image gives 4 x 4 tokens. Images up to 64 pixels split into up to 2 x 2.
    def build(seed: int):
        tok = build_tokenizer()
        markers = [FAKE_TOKEN, GLOBAL_TAG, "<end_of_utterance>"] + [row_col_tag(i, j) for i in range(6) for j in range(6)]
        tok.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=4)
        text = LlamaConfig(vocab_size=len(tok), **_TEXT, **_special_ids(tok))
        ip_kwargs = dict(size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=True, **_NORM)
        seq = (IMAGE_SIZE // 4 // 2) ** 2
        torch.manual_seed(seed)
        if smolvlm:
            config = SmolVLMConfig(vision_config=SmolVLMVisionConfig(**vision), text_config=text, scale_factor=2, image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id)
            model = SmolVLMForConditionalGeneration(config).eval()
            processor = SmolVLMImageProcessor(SmolVLMImageProcessorPil(**ip_kwargs), tok, image_seq_len=seq, chat_template=tok.chat_template)
        else:
            config = Idefics3Config(vision_config=Idefics3VisionConfig(**vision), text_config=text, scale_factor=2, image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id)
            model = Idefics3ForConditionalGeneration(config).eval()
            processor = Idefics3Processor(Idefics3ImageProcessorPil(**ip_kwargs), tok, image_seq_len=seq, chat_template=tok.chat_template)
        return model, processor

    return build


INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


def _internvl(seed: int):
    # Tiles of 32 x 32 pixels in 8 x 8 patches of 4 (+ CLS); the pixel shuffle folds 2 x 2 blocks,
    # so a tile gives 4 x 4 tokens. Images become 1 to 4 tiles, plus a thumbnail when more than one.
    tok = build_tokenizer(
        chat_template=LLAVA_CHAT_TEMPLATE.replace(IMAGE_TOKEN, INTERNVL_TOKENS["context_image_token"]),
        extra_special_tokens=INTERNVL_TOKENS,
    )
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[4, 4])
    config = InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(vocab_size=len(tok), **_TEXT, **_special_ids(tok)),
        image_token_id=tok.context_image_token_id,
        image_seq_length=(IMAGE_SIZE // 4 // 2) ** 2,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True, min_patches=1, max_patches=4, **_NORM
    )
    processor = InternVLImageProcessor(image_processor, tok, image_seq_length=config.image_seq_length, chat_template=tok.chat_template)
    return model, processor


LLAMA4_TOKENS = {"image_token": "<|image|>", "patch_token": "<|patch|>", "start_of_image_token": "<|image_start|>",
                 "end_of_image_token": "<|image_end|>", "tile_x_separator_token": "<|tile_x_separator|>",
                 "tile_y_separator_token": "<|tile_y_separator|>"}


def llama4_tokenizer():
    """The shared word-level tokenizer with Llama 4's image tokens and markers; the chat template writes
    ``<|image|>`` for each image, which the processor expands."""
    return build_tokenizer(chat_template=LLAVA_CHAT_TEMPLATE.replace(IMAGE_TOKEN, LLAMA4_TOKENS["image_token"]),
                           extra_special_tokens=LLAMA4_TOKENS)


def llama4_processor(tok, tile: int = 32, patch_size: int = 4, max_patches: int = 4):
    """HF's `Llama4Processor` with `Llama4ImageProcessorPil` (HF's tiling rule on PIL): images fit up to
    `max_patches` tiles of `tile` px (plus the global tile where there are several)."""
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    from embedlens.adapters.llama4_tiles import Llama4ImageProcessorPil

    ip = Llama4ImageProcessorPil(size={"height": tile, "width": tile}, max_patches=max_patches)
    return Llama4Processor(image_processor=ip, tokenizer=tok, patch_size=patch_size, pixel_shuffle_ratio=0.5,
                           chat_template=tok.chat_template, **LLAMA4_TOKENS)


def _llama4(seed: int):
    # Llama 4: a ViT of 3 layers, width 32, on 32-px tiles of 4-px patches (class token last), pixel-shuffled 2 x 2:
    # 16 tokens a tile, images cut into up to 4 tiles + the global one. The LM: chunked attention (chunks of 8, shorter
    # than every prompt) with rotary embeddings on layers 0-2, a global NoPE layer 3 (as every 4th layer of the released
    # models), mixture-of-experts feed-forwards (4 experts, top 1, + the shared one) on layers 1 and 3.
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    tok = llama4_tokenizer()
    text = dict(vocab_size=len(tok), head_dim=16, intermediate_size=64, intermediate_size_mlp=128, num_local_experts=4,
                num_experts_per_tok=1, moe_layers=[1, 3], attention_chunk_size=8, no_rope_layers=[1, 1, 1, 0],
                **{k: v for k, v in _TEXT.items() if k != "intermediate_size"}, **_special_ids(tok))
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=4, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5)
    config = Llama4Config(text_config=text, vision_config=vision, image_token_index=tok.patch_token_id,
                          boi_token_index=tok.start_of_image_token_id, eoi_token_index=tok.end_of_image_token_id)
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config).eval()
    return model, llama4_processor(tok)

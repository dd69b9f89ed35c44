"""Tiny models of the LLaVA line: LLaVA (CLIP and SigLIP towers), LLaVA-NeXT, LLaVA-NeXT-Video,
LLaVA-OneVision, and the Pixtral-tower ones (Mistral 3, LLaVA-Pixtral) with their tokenizer and processor."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    Mistral3ForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from embedlens.adapters.llava_onevision import OnevisionImageProcessor
from embedlens.testing.tiny._common import (
    _NORM,
    _TEXT,
    _VISION,
    GRID,
    IMAGE_SIZE,
    PATCH_SIZE,
    Builder,
    _special_ids,
)
from embedlens.tokenizer import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tokenizer


def _llava(tower: str) -> Builder:
    def build(seed: int):
        tok = build_tokenizer()
        if tower == "clip":
            vision = CLIPVisionConfig(**_VISION)
            image_processor = CLIPImageProcessorPil(
                size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **_NORM
            )
            strategy, extra = "default", 1  # CLIP's CLS token is dropped, as in LLaVA-1.5
        else:
            vision = SiglipVisionConfig(**_VISION)
            image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **_NORM)
            strategy, extra = "full", 0  # SigLIP has no CLS token
        config = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(vocab_size=len(tok), **_TEXT, **_special_ids(tok)),
            image_token_id=tok.image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy=strategy,
            projector_hidden_act="gelu",
        )
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=PATCH_SIZE,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=extra,
            chat_template=tok.chat_template,
        )
        return model, processor

    return build


def _onevision(seed: int):
    tok = build_tokenizer()
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_VISION),
        text_config=Qwen2Config(vocab_size=len(tok), **_TEXT, **_special_ids(tok)),
        image_token_id=tok.image_token_id,
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=pinpoints, **_NORM
    )
    processor = OnevisionImageProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        num_image_tokens=GRID * GRID,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=tok.chat_template,
    )
    return model, processor


def _llava_next(seed: int):
    # A CLIP tower with the "default" strategy, as llava-v1.6 checkpoints: the CLS
    # token is dropped from every tile, base image and anyres tiles alike.
    tok = build_tokenizer()
    pinpoints = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_VISION),
        text_config=LlamaConfig(vocab_size=len(tok), **_TEXT, **_special_ids(tok)),
        image_token_id=tok.image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=pinpoints, **_NORM,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return model, processor


def _llava_next_video(seed: int):
    # LLaVA-NeXT's tiny model (CLIP tower, "default" strategy, anyres images) with a video path: 32-px frames of 4 x 4
    # patches pooled 2 x 2 (the model's default stride), so 2 x 2 video tokens per frame.
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from embedlens.adapters.llava_next_video import LlavaNextVideoImageProcessor, frame_processor

    tok = build_tokenizer()
    pinpoints = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**_VISION),
        text_config=LlamaConfig(vocab_size=len(tok), **_TEXT, **_special_ids(tok)),
        image_token_id=tok.image_token_id,
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=pinpoints, **_NORM,
    )
    frames = frame_processor(dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **_NORM))
    processor = LlavaNextVideoImageProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        frame_processor=frames,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return model, processor


MISTRAL3_TOKENS = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
MISTRAL3_PATCH = 8  # 8-px patches, 2 x 2 merged: a token covers 16 x 16 pixels
MISTRAL3_LONGEST_EDGE = 64


def mistral3_tokenizer():
    """The shared word-level tokenizer with Pixtral's ``[IMG]``, ``[IMG_BREAK]`` and ``[IMG_END]``; the chat
    template writes ``[IMG]`` for each image, as Mistral's does."""
    return build_tokenizer(chat_template=LLAVA_CHAT_TEMPLATE.replace(IMAGE_TOKEN + "\n", MISTRAL3_TOKENS["image_token"]),
                           extra_special_tokens=MISTRAL3_TOKENS)


def mistral3_processor(tok, patch_size: int = MISTRAL3_PATCH, merge_size: int = 2, longest_edge: int = MISTRAL3_LONGEST_EDGE):
    """HF's `PixtralProcessor` with the PIL `PixtralImageProcessorPil` (no torchvision). Images shrink to fit
    `longest_edge` and round up to whole merged blocks: with the defaults the test images (64 x 64, 40 x 70,
    48 x 48) give 4 x 4, 3 x 4 and 3 x 3 tokens."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from embedlens.adapters.mistral3 import PixtralProcessor

    ip = PixtralImageProcessorPil(size={"longest_edge": longest_edge}, patch_size={"height": patch_size, "width": patch_size}, **_NORM)
    return PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size, spatial_merge_size=merge_size,
                            chat_template=tok.chat_template, **MISTRAL3_TOKENS)


def _mistral3(seed: int):
    # 3 Pixtral layers of width 32 on 8-px patches (2-D RoPE from each patch's row and column; the tower never reads
    # image_size, set to the largest image), merged 2 x 2 in the projector. The Mistral LLM slides a window of 8 over
    # every layer: shorter than every prompt and than the 16 tokens of a 64-px image.
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    tok = mistral3_tokenizer()
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=64, patch_size=MISTRAL3_PATCH)
    text = MistralConfig(vocab_size=len(tok), head_dim=16, sliding_window=8, **_TEXT, **_special_ids(tok))
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=tok.image_token_id, spatial_merge_size=2,
                            vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    return model, mistral3_processor(tok)


def _llava_pixtral(seed: int):
    # Pixtral-12B's layout: LlavaForConditionalGeneration, a Pixtral tower (3 layers of width 32 on 8-px patches, as
    # tiny:mistral3) and LLaVA's MLP projector, no patch merger: one [IMG] token per patch, so a 64-px image is 8 x 8
    # tokens. "full" feature selection and no sliding window, as Pixtral-12B's config.
    from transformers import MistralConfig, PixtralVisionConfig

    tok = mistral3_tokenizer()
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=64, patch_size=MISTRAL3_PATCH)
    text = MistralConfig(vocab_size=len(tok), head_dim=16, sliding_window=None, **_TEXT, **_special_ids(tok))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                         vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, mistral3_processor(tok, merge_size=1)

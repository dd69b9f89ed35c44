"""Tiny, randomly initialised models of every supported family, built offline.

Each is a real Hugging Face class (`LlavaForConditionalGeneration`, ...) made
from a small config, with a word-level tokenizer and a real processor, so that
tests and demos exercise exactly the code paths a released checkpoint does.

Example:
    >>> from embedlens.testing import tiny_model
    >>> model, processor = tiny_model("llava-clip")
    >>> type(model).__name__
    'LlavaForConditionalGeneration'
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
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
    Qwen3_5ForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2Config,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from embedlens.adapters.idefics3 import FAKE_TOKEN, GLOBAL_TAG, SmolVLMImageProcessor, row_col_tag
from embedlens.adapters.internvl import InternVLImageProcessor
from embedlens.adapters.llava_onevision import OnevisionImageProcessor
from embedlens.tokenizer import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tokenizer

IMAGE_SIZE = 32
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE  # 4 x 4 patches per image (or tile)
TEXT_HIDDEN = 64

_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
)
_TEXT = dict(
    hidden_size=TEXT_HIDDEN,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
_NORM = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


@dataclass(frozen=True)
class TinySpec:
    """One tiny configuration: a family, its vision tower, and how to build it.

    `name` (``tiny:NAME``) is the family's adapter name (`family`, its ``model.adapter`` key), or
    ``FAMILY-TOWER`` where one family has tiny models with different towers (``llava-clip``, ``llava-siglip``).
    """

    name: str
    family: str
    tower: str
    build: Callable[[int], tuple[PreTrainedModel, ProcessorMixin]]


def _special_ids(tokenizer) -> dict:
    return dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _llava(tower: str) -> Callable[[int], tuple[PreTrainedModel, ProcessorMixin]]:
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


def _idefics3_family(smolvlm: bool) -> Callable[[int], tuple[PreTrainedModel, ProcessorMixin]]:
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


def _qwen_vl(version: str) -> Callable[[int], tuple[PreTrainedModel, ProcessorMixin]]:
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


def molmo2_tokenizer():
    """The shared word-level tokenizer with Molmo2's image markers; no BOS of its own (Molmo2's processor puts one in
    front of each prompt, as for its Qwen3 tokenizers)."""
    from tokenizers import processors

    from embedlens.adapters.molmo2 import MARKERS

    tok = build_tokenizer(extra_special_tokens={f"molmo2_marker_{i}": m for i, m in enumerate(MARKERS)})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return tok


def molmo2_processor(tok, crop: int = 28, patch_size: int = 4, max_crops: int = 4, overlap_margins=(1, 2)):
    """`Molmo2Processor` (without its video part) with HF's crop rule on PIL: `crop`-px crops of `patch_size`-px
    patches, pooled 2 x 2, up to `max_crops` overlapping by `overlap_margins` patches, plus the low-res view."""
    from embedlens.adapters.molmo2 import Molmo2ImageProcessor
    from embedlens.adapters.molmo2_crops import Molmo2ImageProcessorNoTorchvision

    ip = Molmo2ImageProcessorNoTorchvision(size={"height": crop, "width": crop}, patch_size=patch_size, max_crops=max_crops,
                                           overlap_margins=list(overlap_margins), pooling_size=[2, 2], **_NORM)
    return Molmo2ImageProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)


def _molmo2(seed: int):
    # Molmo2: a ViT of 3 layers, width 32, on 28-px crops of 4-px patches (7 x 7), the adapter pooling 2 x 2 blocks
    # (4 x 4 tokens a view, the edge blocks partly empty) from the last two layers concatenated; images cut into up to
    # 4 crops overlapping by margins of 1 and 2 patches (so that pooled blocks straddle the seams), after the low-res
    # view. The LM: Qwen3-style, 4 layers. The adapter's weights are drawn wider (initializer_range 0.3) so that its
    # rows, added to the image tokens' embeddings, are of their size: its gated MLP is quadratic in small inputs, and
    # at the default 0.02 its rows are ~1e-9.
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration

    tok = molmo2_tokenizer()
    text = dict(vocab_size=len(tok), hidden_act="silu", rope_theta=10000.0, **_TEXT, **_special_ids(tok))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                  head_dim=8, image_size=[28, 28], patch_size=4)
    adapter = dict(vision_feature_layer=[-1, -2], hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                   intermediate_size=64, text_hidden_size=TEXT_HIDDEN, hidden_act="silu", initializer_range=0.3)
    config = Molmo2Config(text_config=text, vision_config=vision, adapter_config=adapter,
                          image_start_token_id=tok.convert_tokens_to_ids("<im_start>"),
                          image_end_token_id=tok.convert_tokens_to_ids("<im_end>"),
                          image_patch_id=tok.convert_tokens_to_ids("<im_patch>"))
    torch.manual_seed(seed)
    model = Molmo2ForConditionalGeneration(config).eval()
    return model, molmo2_processor(tok)


TINY_SPECS: dict[str, TinySpec] = {
    s.name: s
    for s in (
        TinySpec("llava-clip", "llava", "clip", _llava("clip")),
        TinySpec("llava-siglip", "llava", "siglip", _llava("siglip")),
        TinySpec("llava_onevision", "llava_onevision", "siglip", _onevision),
        TinySpec("paligemma", "paligemma", "siglip", _paligemma),
        TinySpec("llava_next", "llava_next", "clip", _llava_next),
        TinySpec("idefics3", "idefics3", "idefics3", _idefics3_family(smolvlm=False)),
        TinySpec("smolvlm", "smolvlm", "smolvlm", _idefics3_family(smolvlm=True)),
        TinySpec("internvl", "internvl", "internvit", _internvl),
        TinySpec("qwen2_vl", "qwen2_vl", "qwen2-vit", _qwen_vl("2")),
        TinySpec("qwen2_5_vl", "qwen2_5_vl", "qwen2.5-vit", _qwen_vl("2.5")),
        TinySpec("qwen3_vl", "qwen3_vl", "qwen3-vit", _qwen_vl("3")),
        TinySpec("gemma3", "gemma3", "siglip", _gemma3),
        TinySpec("mistral3", "mistral3", "pixtral", _mistral3),
        TinySpec("llava_onevision1_5", "llava_onevision1_5", "rice-vit", _onevision1_5),
        TinySpec("qwen3_5", "qwen3_5", "qwen3-vit", _qwen3_5),
        TinySpec("qwen3_vl_moe", "qwen3_vl_moe", "qwen3-vit", _qwen3_vl_moe),
        TinySpec("llava_pixtral", "llava_pixtral", "pixtral", _llava_pixtral),
        TinySpec("gemma4", "gemma4", "gemma4-vit", _gemma4),
        TinySpec("glm4v", "glm4v", "glm4v-vit", _glm4v),
        TinySpec("glm4v_moe", "glm4v_moe", "glm4v-vit", _glm4v_moe),
        TinySpec("llama4", "llama4", "llama4-vit", _llama4),
        TinySpec("llava_next_video", "llava_next_video", "clip", _llava_next_video),
        TinySpec("molmo2", "molmo2", "molmo2-vit", _molmo2),
    )
}


#: Old spellings of tiny names, before each became its adapter's name (`model.adapter`); they load the same model.
TINY_ALIASES: dict[str, str] = {
    "llava-onevision": "llava_onevision",
    "llava-next": "llava_next",
    "qwen2-vl": "qwen2_vl",
    "qwen2.5-vl": "qwen2_5_vl",
    "qwen3-vl": "qwen3_vl",
}


def tiny_model(name: str = "llava-clip", seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build one tiny model and its processor, in float32 on the CPU.

    Args:
        name: one of `TINY_SPECS` (`llava-clip`, `llava-siglip`,
            `llava_onevision`, `paligemma`, `llava_next`, `idefics3`, `smolvlm`, `internvl`,
            `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `gemma3`, `mistral3`, `llava_onevision1_5`, `qwen3_5`,
            `qwen3_vl_moe`, `llava_pixtral`, `gemma4`, `glm4v`, `glm4v_moe`, `llama4`, `llava_next_video`, `molmo2`), or an old
            spelling in `TINY_ALIASES` (same model, with a DeprecationWarning).
        seed: seed of the random initialisation.

    Returns:
        `(model, processor)`, the model in eval mode.

    Raises:
        UnknownNameError: if `name` is not a tiny model.
    """
    from embedlens.errors import UnknownNameError

    name = canonical_tiny_name(name)
    if name not in TINY_SPECS:
        raise UnknownNameError.make("tiny model", name, TINY_SPECS)
    return TINY_SPECS[name].build(seed)


def canonical_tiny_name(name: str) -> str:
    """`name`, or the name an old spelling in `TINY_ALIASES` now has (with a DeprecationWarning)."""
    if name in TINY_ALIASES:
        warnings.warn(f"tiny model {name!r} is now spelled {TINY_ALIASES[name]!r} (its adapter's name); "
                      f"the old name still loads the same model", DeprecationWarning, stacklevel=3)
        return TINY_ALIASES[name]
    return name


def save_tiny_model(name: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny model and its processor to `directory` with `save_pretrained`.

    The folder then loads like any checkpoint, through `embedlens.load_model`.
    """
    directory = Path(directory)
    model, processor = tiny_model(name, seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def tiny_batch(name: str = "llava-clip", n: int = 2, padding_side: str = "right"):
    """A tiny model's adapter and an encoded batch of `n` shape images with questions.

    Example:
        >>> adapter, batch = tiny_batch("paligemma", n=3)
        >>> batch.input_ids.shape[0]
        3
    """
    from embedlens.adapters import load_model
    from embedlens.data import Sample
    from embedlens.testing.images import shapes

    adapter = load_model(f"tiny:{name}")
    questions = ["what is it?", "what colour is the square?", "count the shapes", "is there a circle?"]
    samples = [
        Sample([shapes(32 + 8 * (i % 3), seed=i)], question=questions[i % len(questions)], id=f"s{i}") for i in range(n)
    ]
    return adapter, adapter.encode(samples, padding_side=padding_side)

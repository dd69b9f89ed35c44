"""The LLaVA line's tester configurations: LLaVA, LLaVA-OneVision, LLaVA-NeXT, LLaVA-NeXT-Video, Mistral 3 and
Pixtral-12B (a LLaVA with a Pixtral tower).

The values are the testers' (transformers ``tests/models/*/test_modeling_*.py``). Keys the testers
pass that the config classes do not read (seq_length, is_training, use_labels, dropout probabilities,
num_labels, ...) are left out; they change nothing in the model. Only the vocabulary is ours.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from embedlens.adapters.llava_onevision import OnevisionImageProcessor
from embedlens.tokenizer import build_tokenizer
from tests.support.hf_testers._common import _NORM, Builder, _ids


#: `LlavaVisionText2TextModelTester` (tests/models/llava/test_modeling_llava.py).
LLAVA_TESTER = dict(
    text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, hidden_act="gelu",
              max_position_embeddings=512, initializer_range=0.02),
    vision=dict(image_size=8, patch_size=2, num_channels=3, hidden_size=32, projection_dim=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=37, dropout=0.1, attention_dropout=0.1, initializer_range=0.02),
    top=dict(projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
             image_seq_length=16),  # (8 // 2) ** 2 patches
)


def llava_builder(
    strategy: str = "default",
    feature_layer: int | list[int] = -1,
    tie_word_embeddings: bool = False,
    image_seq_length: int | None = 16,
) -> Builder:
    """A LLaVA (CLIP tower, Llama LM) on the LLaVA tester's values, with the given variant.

    Args:
        strategy: ``vision_feature_select_strategy``; "full" keeps CLIP's CLS token.
        feature_layer: ``vision_feature_layer``, an int or a list (features concatenated).
        tie_word_embeddings: tie ``lm_head`` to the input embeddings.
        image_seq_length: the config's ``image_seq_length``; None keeps LlavaConfig's default
            (576), which need not equal the tower's patch count (the model never reads it).
    """
    t = LLAVA_TESTER

    def build(seed: int):
        tok = build_tokenizer()
        vision = CLIPVisionConfig(**t["vision"])
        top = {**t["top"], "vision_feature_select_strategy": strategy, "vision_feature_layer": feature_layer}
        if image_seq_length is None:
            top.pop("image_seq_length")
        else:
            top["image_seq_length"] = image_seq_length
        config = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(vocab_size=len(tok), tie_word_embeddings=tie_word_embeddings, **t["text"], **_ids(tok)),
            image_token_id=tok.image_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **top,
        )
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
        size = vision.image_size
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **_NORM),
            tokenizer=tok,
            patch_size=vision.patch_size,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=1,  # CLIP's CLS token
            chat_template=tok.chat_template,
        )
        return model, processor

    return build


#: `LlavaOnevisionVisionText2TextModelTester` (tests/models/llava_onevision/test_modeling_llava_onevision.py).
ONEVISION_TESTER = dict(
    text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=37,
              hidden_act="gelu", max_position_embeddings=580, initializer_range=0.02),
    vision=dict(image_size=16, patch_size=8, num_channels=3, hidden_size=32, projection_dim=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=37, dropout=0.1, attention_dropout=0.1, initializer_range=0.02),
    top=dict(projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
             image_grid_pinpoints=[[16, 16]]),
)


def onevision_builder(
    pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
    feature_layer: int | list[int] = -1,
) -> Builder:
    """A LLaVA-OneVision (SigLIP tower, Qwen2 LM) on the OneVision tester's values.

    Args:
        pinpoints: ``image_grid_pinpoints`` (default: the tester's ``[[16, 16]]``, one tile).
        vision_aspect_ratio: ``anyres_max_N``; grids of more than N tiles' worth of patches are
            downsampled by the model.
        feature_layer: ``vision_feature_layer``.
    """
    t = ONEVISION_TESTER

    def build(seed: int):
        tok = build_tokenizer()
        grid_pinpoints = pinpoints or t["top"]["image_grid_pinpoints"]
        vision = SiglipVisionConfig(**t["vision"])
        top = {**t["top"], "image_grid_pinpoints": grid_pinpoints, "vision_feature_layer": feature_layer}
        config = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=Qwen2Config(vocab_size=len(tok), **t["text"], **_ids(tok)),
            image_token_id=tok.image_token_id,
            video_token_id=tok.convert_tokens_to_ids("<video>"),
            vision_aspect_ratio=vision_aspect_ratio,
            **top,
        )
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        size = vision.image_size
        processor = OnevisionImageProcessor(
            image_processor=LlavaOnevisionImageProcessorPil(
                size={"height": size, "width": size}, image_grid_pinpoints=grid_pinpoints, **_NORM
            ),
            tokenizer=tok,
            num_image_tokens=(size // vision.patch_size) ** 2,
            vision_feature_select_strategy=top["vision_feature_select_strategy"],
            vision_aspect_ratio=vision_aspect_ratio,
            chat_template=tok.chat_template,
        )
        return model, processor

    return build


#: `LlavaNextVisionText2TextModelTester` (tests/models/llava_next/test_modeling_llava_next.py).
LLAVA_NEXT_TESTER = dict(
    text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, hidden_act="gelu",
              max_position_embeddings=580, initializer_range=0.02),
    vision=dict(image_size=16, patch_size=2, num_channels=3, hidden_size=32, projection_dim=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=37, dropout=0.1, attention_dropout=0.1, initializer_range=0.02),
    top=dict(projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
             image_grid_pinpoints=[[32, 32]]),
)


def llava_next_builder() -> Builder:
    """LLaVA-NeXT from its tester: CLIP 16-px tiles of 2-px patches, one 32-px pinpoint (base + 2 x 2 tiles)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    t = LLAVA_NEXT_TESTER

    def build(seed: int):
        tok = build_tokenizer()
        config = LlavaNextConfig(text_config=LlamaConfig(vocab_size=len(tok), **t["text"], **_ids(tok)),
                                 vision_config=CLIPVisionConfig(**t["vision"]), image_token_id=tok.image_token_id, **t["top"])
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config).eval()
        size = t["vision"]["image_size"]
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                        image_grid_pinpoints=t["top"]["image_grid_pinpoints"])
        processor = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=t["vision"]["patch_size"],
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=tok.chat_template)
        return model, processor

    return build


#: `LlavaNextVideoVisionText2TextModelTester` (tests/models/llava_next_video/test_modeling_llava_next_video.py): LLaVA-NeXT's
#: values (16-px tiles of 2-px patches, one 32-px pinpoint) with ``video_token_index`` and LlavaNextVideoConfig's default
#: pooling (average, stride 2: each 8 x 8 frame grid pooled to 4 x 4 tokens); its videos have 8 frames.
LLAVA_NEXT_VIDEO_TESTER = dict(text=LLAVA_NEXT_TESTER["text"], vision=LLAVA_NEXT_TESTER["vision"], top=LLAVA_NEXT_TESTER["top"],
                               frames=8)


def llava_next_video_builder(pool_mode: str = "average") -> Builder:
    """LLaVA-NeXT-Video from its tester: LLaVA-NeXT's images, 16-px video frames pooled 2 x 2.

    Args:
        pool_mode: ``spatial_pool_mode`` (the tester keeps the default, "average"; "conv" pools with learned weights).
    """
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from embedlens.adapters.llava_next_video import LlavaNextVideoImageProcessor, frame_processor

    t = LLAVA_NEXT_VIDEO_TESTER

    def build(seed: int):
        tok = build_tokenizer()
        config = LlavaNextVideoConfig(text_config=LlamaConfig(vocab_size=len(tok), **t["text"], **_ids(tok)),
                                      vision_config=CLIPVisionConfig(**t["vision"]), image_token_id=tok.image_token_id,
                                      video_token_id=tok.convert_tokens_to_ids("<video>"), spatial_pool_mode=pool_mode, **t["top"])
        torch.manual_seed(seed)
        model = LlavaNextVideoForConditionalGeneration(config).eval()
        size = t["vision"]["image_size"]
        crop = {"height": size, "width": size}
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size=crop, image_grid_pinpoints=t["top"]["image_grid_pinpoints"])
        processor = LlavaNextVideoImageProcessor(image_processor=ip, tokenizer=tok, frame_processor=frame_processor(dict(size={"shortest_edge": size}, crop_size=crop)),
                                                 patch_size=t["vision"]["patch_size"], vision_feature_select_strategy="default",
                                                 num_additional_image_tokens=1, chat_template=tok.chat_template)
        return model, processor

    return build


#: `Mistral3VisionText2TextModelTester` (tests/models/mistral3/test_modeling_mistral3.py): Mistral text and Pixtral
#: vision configs of its own, Mistral3Config's default 2 x 2 patch merger. The tester feeds 30-px images of 6-px
#: patches, a 5 x 5 grid the merger's ``unfold`` floors to 2 x 2 tokens (``image_seq_length=4``); a processor never
#: gives such a grid (it rounds each side up to whole 12-px merged blocks), so here images are 12-px multiples up to
#: 60 px. Its ``sliding_window=None`` means full attention on both layers. Mistral3Config drops the tester's
#: ``image_seq_length`` (kept here as the tester writes it): nothing in the model reads one.
MISTRAL3_TESTER = dict(
    text=dict(model_type="mistral", attention_dropout=0.0, hidden_act="silu", hidden_size=32, initializer_range=0.02,
              intermediate_size=37, max_position_embeddings=512, num_attention_heads=4, num_hidden_layers=2,
              num_key_value_heads=2, rms_norm_eps=1e-05, rope_theta=1000000000.0, sliding_window=None),
    vision=dict(model_type="pixtral", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                image_size=30, patch_size=6, num_channels=3, hidden_act="gelu"),
    top=dict(vision_feature_layer=-1, image_seq_length=4),
    longest_edge=60,
)


def mistral3_builder(sliding_window: int | None = None) -> Builder:
    """Mistral 3 from its tester: Pixtral on 6-px patches merged 2 x 2, a 2-layer Mistral.

    Args:
        sliding_window: replaces the tester's None (full attention) so that a window bites on the test prompts.
    """
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from embedlens.testing.tiny import mistral3_processor, mistral3_tokenizer

    t = MISTRAL3_TESTER

    def build(seed: int):
        tok = mistral3_tokenizer()
        text = dict(t["text"], vocab_size=len(tok), **_ids(tok))
        if sliding_window is not None:
            text["sliding_window"] = sliding_window
        config = Mistral3Config(text_config=text, vision_config=t["vision"], image_token_index=tok.image_token_id, **t["top"], **_ids(tok))
        torch.manual_seed(seed)
        model = Mistral3ForConditionalGeneration(config).eval()
        processor = mistral3_processor(tok, patch_size=t["vision"]["patch_size"], merge_size=config.spatial_merge_size,
                                       longest_edge=t["longest_edge"])
        return model, processor

    return build


#: Pixtral-12B is a `LlavaForConditionalGeneration` with a Pixtral tower; transformers tests that pairing only on the
#: real checkpoint, so its tester values are the two testers it joins: `LlavaVisionText2TextModelTester`'s text and
#: top-level values (`LLAVA_TESTER`) and `PixtralVisionModelTester`'s tower (tests/models/pixtral/
#: test_modeling_pixtral.py: 30-px images of 2-px patches, 15 x 15 patches, each one token, as LLaVA's projector
#: merges none). Feature selection is "full", as Pixtral-12B's config (the tower has no CLS token).
PIXTRAL_TESTER = dict(
    vision=dict(model_type="pixtral", image_size=30, patch_size=2, num_channels=3, hidden_size=32, projection_dim=32,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, dropout=0.1, attention_dropout=0.1,
                initializer_range=0.02),
    longest_edge=30,
)


def llava_pixtral_builder(sliding_window: int | None = None) -> Builder:
    """Pixtral-12B's layout on the testers' values: the LLaVA tester's Llama text model, or (with `sliding_window`)
    Pixtral-12B's Mistral text model with that window, so that it bites on the test prompts."""
    from transformers import MistralConfig

    from embedlens.testing.tiny import mistral3_processor, mistral3_tokenizer

    t, v = LLAVA_TESTER, PIXTRAL_TESTER

    def build(seed: int):
        tok = mistral3_tokenizer()
        if sliding_window is None:
            text = LlamaConfig(vocab_size=len(tok), **t["text"], **_ids(tok))
        else:
            # MistralConfig's own default is 8 key/value heads; the tester's Llama has as many as query heads
            text = MistralConfig(vocab_size=len(tok), sliding_window=sliding_window, num_key_value_heads=t["text"]["num_attention_heads"],
                                 **t["text"], **_ids(tok))
        top = {**t["top"], "vision_feature_select_strategy": "full", "image_seq_length": 1}
        config = LlavaConfig(vision_config=v["vision"], text_config=text, image_token_id=tok.image_token_id, **top)
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
        processor = mistral3_processor(tok, patch_size=v["vision"]["patch_size"], merge_size=1, longest_edge=v["longest_edge"])
        return model, processor

    return build

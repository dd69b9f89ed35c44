"""Tiny models built from the configurations of Hugging Face's own test suite.

`embedlens.testing.tiny` builds the models embedlens chose for itself; this
module builds, for every supported family, the ones Hugging Face tests its
classes with: the values of the ``*ModelTester`` classes in transformers'
``tests/models/NAME/test_modeling_NAME.py`` (``get_config()``), and the
variants those test files switch on (list-valued ``vision_feature_layer``,
``full`` and ``default`` feature selection, tied embeddings, a Gemma2 text
config). Only the vocabulary is ours: every variant uses embedlens's offline
word-level tokenizer, so ``vocab_size`` and the special-token ids follow it.

A new family's adapter is checked by adding its tester's values here as one
more `HFTesterConfig`; ``tests/adapters/test_hf_configs.py`` runs every entry.

Test support, not installed with the package (the suite is the only user;
tiny models for plugin authors stay in `embedlens.testing`).

Example:
    >>> from tests.support.hf_testers import TESTER_CONFIGS
    >>> model, processor = TESTER_CONFIGS["paligemma2"].build(0)
    >>> model.config.text_config.model_type, model.config.text_config.final_logit_softcapping
    ('gemma2', 30.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from embedlens.adapters.llava_onevision import OnevisionImageProcessor
from embedlens.tokenizer import build_tokenizer

Builder = Callable[[int], tuple[PreTrainedModel, ProcessorMixin]]
_NORM = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])

# -- the testers' values (transformers tests/models/*/test_modeling_*.py) --------------------------
# Keys the testers pass that the config classes do not read (seq_length, is_training, use_labels,
# dropout probabilities, num_labels, ...) are left out; they change nothing in the model.

#: `LlavaVisionText2TextModelTester` (tests/models/llava/test_modeling_llava.py).
LLAVA_TESTER = dict(
    text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, hidden_act="gelu",
              max_position_embeddings=512, initializer_range=0.02),
    vision=dict(image_size=8, patch_size=2, num_channels=3, hidden_size=32, projection_dim=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=37, dropout=0.1, attention_dropout=0.1, initializer_range=0.02),
    top=dict(projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
             image_seq_length=16),  # (8 // 2) ** 2 patches
)

#: `LlavaOnevisionVisionText2TextModelTester` (tests/models/llava_onevision/test_modeling_llava_onevision.py).
ONEVISION_TESTER = dict(
    text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=37,
              hidden_act="gelu", max_position_embeddings=580, initializer_range=0.02),
    vision=dict(image_size=16, patch_size=8, num_channels=3, hidden_size=32, projection_dim=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=37, dropout=0.1, attention_dropout=0.1, initializer_range=0.02),
    top=dict(projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
             image_grid_pinpoints=[[16, 16]]),
)

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


@dataclass(frozen=True)
class HFTesterConfig:
    """One variant of a Hugging Face tester configuration and how to build it.

    Attributes:
        name: key in `TESTER_CONFIGS`.
        family: the embedlens adapter that must load it.
        origin: where the values come from (tester class and the variant's change).
        build: ``build(seed) -> (model, processor)``, float32, eval mode, on the CPU.
        image_sizes: (height, width) of the test images; anyres families tile them differently.
        images_per_sample: images in each test prompt (several exercise multi-image merging).
        downsamples: the family's anyres_max downsampling applies to these images.
    """

    name: str
    family: str
    origin: str
    build: Builder
    image_sizes: tuple[tuple[int, int], ...] = ((24, 24),)
    images_per_sample: int = 1
    downsamples: bool = False


def _ids(tok) -> dict[str, int]:
    return dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


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


# -- families added by issue 18 (their testers' values; only the vocabulary is ours, as above) -------------------

#: `LlavaNextVisionText2TextModelTester` (tests/models/llava_next/test_modeling_llava_next.py).
LLAVA_NEXT_TESTER = dict(
    text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, hidden_act="gelu",
              max_position_embeddings=580, initializer_range=0.02),
    vision=dict(image_size=16, patch_size=2, num_channels=3, hidden_size=32, projection_dim=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=37, dropout=0.1, attention_dropout=0.1, initializer_range=0.02),
    top=dict(projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
             image_grid_pinpoints=[[32, 32]]),
)

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

#: `InternVLVisionText2TextModelTester` (tests/models/internvl/test_modeling_internvl.py).
INTERNVL_TESTER = dict(
    text=dict(model_type="qwen2", hidden_size=128, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, hidden_act="silu", max_position_embeddings=512, rope_theta=10000, tie_word_embeddings=True),
    vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=64, patch_size=4,
                num_channels=3, hidden_act="quick_gelu", use_absolute_position_embeddings=True),
    top=dict(image_seq_length=64, vision_feature_layer=-1),
)


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


_OV_MANY_TILES = [[16 * i, 16 * j] for i in range(1, 4) for j in range(1, 4)]

TESTER_CONFIGS: dict[str, HFTesterConfig] = {
    c.name: c
    for c in (
        HFTesterConfig("llava", "llava", "LlavaVisionText2TextModelTester", llava_builder(), images_per_sample=2),
        HFTesterConfig("llava-full", "llava", "LlavaVisionText2TextModelTester, vision_feature_select_strategy='full' "
                     "(CLIP's CLS token kept)", llava_builder(strategy="full"), images_per_sample=2),
        HFTesterConfig("llava-layers", "llava", "LlavaForConditionalGenerationModelTest.test_vision_feature_layers: "
                     "vision_feature_layer=[-1, -2]", llava_builder(feature_layer=[-1, -2])),
        HFTesterConfig("llava-tied", "llava", "LlavaVisionText2TextModelTester with tied embeddings and LlavaConfig's "
                     "default image_seq_length (576, not the tester's 16 patches)",
                     llava_builder(tie_word_embeddings=True, image_seq_length=None)),
        HFTesterConfig("llava_onevision", "llava_onevision", "LlavaOnevisionVisionText2TextModelTester (one 16-px "
                     "pinpoint: base image + 1 tile, no downsampling)", onevision_builder(),
                     image_sizes=((45, 45), (30, 50))),
        HFTesterConfig("llava_onevision-layers", "llava_onevision", "LlavaOnevisionForConditionalGenerationModelTest."
                     "test_vision_feature_layers: vision_feature_layer=[-1, -2]",
                     onevision_builder(feature_layer=[-1, -2]), image_sizes=((45, 45),)),
        HFTesterConfig("llava_onevision-multi", "llava_onevision", "LlavaOnevisionVisionText2TextModelTester, two images "
                     "per prompt (each one tile: batch_num_images)", onevision_builder(pinpoints=_OV_MANY_TILES),
                     image_sizes=((40, 30),), images_per_sample=2),
        HFTesterConfig("llava_onevision-downsample", "llava_onevision", "LlavaOnevisionVisionText2TextModelTester with "
                     "pinpoints up to 3x3 tiles and anyres_max_1, so that multi-tile grids are downsampled",
                     onevision_builder(pinpoints=_OV_MANY_TILES, vision_aspect_ratio="anyres_max_1"),
                     image_sizes=((48, 48), (44, 30), (30, 47)), downsamples=True),
        HFTesterConfig("paligemma", "paligemma", "PaliGemmaVisionText2TextModelTester (vision_feature_select_strategy="
                     "'default', which PaliGemmaModel ignores)", paligemma_builder("gemma"), image_sizes=((20, 20),),
                     images_per_sample=2),
        HFTesterConfig("paligemma2", "paligemma", "PaliGemma2VisionText2TextModelTester (Gemma2 text config: final "
                     "logit softcapping 30, sliding-window layers)", paligemma_builder("gemma2"), image_sizes=((20, 20),)),
        HFTesterConfig("llava_next", "llava_next", "LlavaNextVisionText2TextModelTester (one 32-px pinpoint: base image "
                     "+ 2 x 2 tiles, unpadded)", llava_next_builder(), image_sizes=((30, 30), (20, 32)), images_per_sample=2),
        HFTesterConfig("llava_next_video", "llava_next_video", "LlavaNextVideoVisionText2TextModelTester (LLaVA-NeXT's "
                     "images; its video path in tests/adapters/test_llava_next_video.py)", llava_next_video_builder(),
                     image_sizes=((30, 30), (20, 32)), images_per_sample=2),
    )
}

#: Families whose tokens are blocks of patches (pixel shuffle, pooling, Qwen-VL's and Mistral 3's mergers) or whose towers differ
#: from LLaVA's. The LLaVA-specific tests of ``tests/adapters/test_hf_configs.py`` assume one patch per token and
#: LLaVA's module names; these entries run there through the block-aware shared proofs instead (role map, each
#: token's patch block by perturbing one patch, sites, pruning equivalence); the Qwen-VL entries also in
#: ``tests/adapters/test_qwen2_vl.py`` (packed towers, M-RoPE).
BLOCK_TESTER_CONFIGS: dict[str, HFTesterConfig] = {
    c.name: c
    for c in (
        HFTesterConfig("idefics3", "idefics3", "Idefics3VisionText2TextModelTester (images split into 16-px sub-images "
                     "+ a global image)", idefics3_builder(), image_sizes=((30, 30), (12, 30))),
        HFTesterConfig("smolvlm", "smolvlm", "SmolVLMVisionText2TextModelTester (as Idefics3's)", idefics3_builder(smolvlm=True),
                     image_sizes=((30, 30), (12, 30))),
        HFTesterConfig("internvl", "internvl", "InternVLVisionText2TextModelTester (64-px tiles, up to 4 + thumbnail)",
                     internvl_builder(), image_sizes=((64, 64), (40, 100))),
        HFTesterConfig("qwen2_vl", "qwen2_vl", "Qwen2VLVisionText2TextModelTester (14-px patches merged 2 x 2; images "
                     "at native resolution up to 84 x 84 px)", qwen_vl_builder("2"), image_sizes=((56, 56), (30, 80)),
                     images_per_sample=2),
        HFTesterConfig("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLVisionText2TextModelTester (14-px patches, no merge, "
                     "112-px windows)", qwen_vl_builder("2.5"), image_sizes=((42, 42), (20, 40)), images_per_sample=2),
        HFTesterConfig("qwen3_vl", "qwen3_vl", "Qwen3VLVisionText2TextModelTester (16-px patches, no merge, DeepStack "
                     "after vision blocks 0 and 1)", qwen_vl_builder("3"), image_sizes=((48, 48), (20, 40)), images_per_sample=2),
        HFTesterConfig("qwen3_vl_moe", "qwen3_vl_moe", "Qwen3VLMoeVisionText2TextModelTester (Qwen3-VL's; every LLM "
                     "layer sparse, 4 of 8 experts per token)", qwen_vl_builder("3-moe"), image_sizes=((48, 48), (20, 40)),
                     images_per_sample=2),
        HFTesterConfig("qwen3_5", "qwen3_5", "Qwen3_5VisionText2TextModelTester (16-px patches, no merge; a full-attention "
                     "layer, then a Gated DeltaNet layer)", qwen_vl_builder("3.5"), image_sizes=((48, 48), (20, 40)),
                     images_per_sample=2),
        HFTesterConfig("qwen3_5-3to1", "qwen3_5", "Qwen3_5VisionText2TextModelTester with the released models' layers: "
                     "three Gated DeltaNet layers, then full attention", qwen_vl_builder("3.5-3to1"),
                     image_sizes=((48, 48), (20, 40)), images_per_sample=2),
        HFTesterConfig("gemma3", "gemma3", "Gemma3Vision2TextModelTester (4 x 4 patches pooled to one token; two sliding "
                     "layers, window 4096)", gemma3_builder(), image_sizes=((20, 20), (12, 30)), images_per_sample=2),
        HFTesterConfig("gemma3-window", "gemma3", "Gemma3Vision2TextModelTester with sliding_window=3, so that the "
                     "window bites on every prompt", gemma3_builder(sliding_window=3), image_sizes=((20, 20),), images_per_sample=2),
        HFTesterConfig("mistral3", "mistral3", "Mistral3VisionText2TextModelTester (Pixtral, 6-px patches merged 2 x 2; "
                     "images at native resolution up to 60 px; no sliding window)", mistral3_builder(),
                     image_sizes=((30, 30), (24, 40)), images_per_sample=2),
        HFTesterConfig("llava_onevision1_5", "llava_onevision1_5", "LlavaOnevisionVision1_5Text2TextModelTester "
                     "(14-px patches, no merge; widths and depths cut)", onevision1_5_builder(),
                     image_sizes=((42, 42), (20, 40)), images_per_sample=2),
        HFTesterConfig("llava_onevision1_5-merge", "llava_onevision1_5", "LlavaOnevisionVision1_5Text2TextModelTester "
                     "with the checkpoints' 2 x 2 merge", onevision1_5_builder(merge=2), image_sizes=((56, 56), (30, 80)),
                     images_per_sample=2),
        HFTesterConfig("glm4v", "glm4v", "Glm4vVisionText2TextModelTester (14-px patches, no merge; images up to 84 px)",
                     glm4v_builder(), image_sizes=((56, 56), (28, 70)), images_per_sample=2),
        HFTesterConfig("glm4v-merge", "glm4v", "Glm4vVisionText2TextModelTester with the checkpoints' 2 x 2 merge",
                     glm4v_builder(merge=2), image_sizes=((112, 112), (56, 140)), images_per_sample=2),
        HFTesterConfig("glm4v_moe", "glm4v_moe", "Glm4vMoeVisionText2TextModelTester (GLM-4V's tester on a mixture-of-"
                     "experts LM: layer 1 routes to 8 experts + a shared one)", glm4v_builder(moe=True),
                     image_sizes=((56, 56), (28, 70)), images_per_sample=2),
        HFTesterConfig("mistral3-window", "mistral3", "Mistral3VisionText2TextModelTester with sliding_window=3, so that "
                     "the window bites on every prompt", mistral3_builder(sliding_window=3), image_sizes=((30, 30),)),
        HFTesterConfig("gemma4", "gemma4", "Gemma4Vision2TextModelTester with Gemma4TextModelTester's LM (per-layer "
                     "inputs, shared key/values, experts, images bidirectional on sliding layers; 5-px patches pooled "
                     "2 x 2, images at most 70 tokens)", gemma4_builder(), image_sizes=((30, 30), (20, 45)), images_per_sample=2),
        HFTesterConfig("gemma4-window", "gemma4", "as gemma4, with sliding_window=3, so that the window bites on every "
                     "prompt", gemma4_builder(sliding_window=3), image_sizes=((30, 30),)),
        HFTesterConfig("llava_pixtral", "llava_pixtral", "LlavaVisionText2TextModelTester's Llama and projector with "
                     "PixtralVisionModelTester's tower (2-px patches, one token each; images at native resolution up "
                     "to 30 px)", llava_pixtral_builder(), image_sizes=((20, 20), (12, 30)), images_per_sample=2),
        HFTesterConfig("llava_pixtral-window", "llava_pixtral", "as llava_pixtral, with Pixtral-12B's Mistral text "
                     "model and sliding_window=3, so that the window bites on every prompt",
                     llava_pixtral_builder(sliding_window=3), image_sizes=((20, 20),)),
        HFTesterConfig("llama4", "llama4", "Llama4ForVisionText2TextModelTester (8-px tiles of 2-px patches, 4 tokens "
                     "each, up to 16 tiles + the global one; chunks of 8192)", llama4_builder(),
                     image_sizes=((16, 16), (8, 20)), images_per_sample=2),
        HFTesterConfig("llama4-chunk", "llama4", "as llama4, with attention_chunk_size=8, so that chunks bite on every "
                     "prompt, and its last layer NoPE with full attention", llama4_builder(chunk=8),
                     image_sizes=((16, 16),)),
    )
}


def hf_tester_model(name: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build one tester-configuration model and its processor.

    Raises:
        UnknownNameError: if `name` is not in `TESTER_CONFIGS`.
    """
    from embedlens.errors import UnknownNameError

    if name not in TESTER_CONFIGS:
        raise UnknownNameError.make("tester configuration", name, TESTER_CONFIGS)
    return TESTER_CONFIGS[name].build(seed)

"""Tiny models built from the configurations of Hugging Face's own test suite.

`embedlens.testing.tiny` builds the models embedlens chose for itself; this
package builds, for every supported family, the ones Hugging Face tests its
classes with: the values of the ``*ModelTester`` classes in transformers'
``tests/models/NAME/test_modeling_NAME.py`` (``get_config()``), and the
variants those test files switch on (list-valued ``vision_feature_layer``,
``full`` and ``default`` feature selection, tied embeddings, a Gemma2 text
config). Only the vocabulary is ours: every variant uses embedlens's offline
word-level tokenizer, so ``vocab_size`` and the special-token ids follow it.

One module per family line holds its testers' values and builders: `llava`
(LLaVA, LLaVA-OneVision, LLaVA-NeXT, LLaVA-NeXT-Video, Mistral 3, Pixtral-12B), `molmo` (Molmo2),
`gemma` (PaliGemma, Gemma 3, Gemma 4), `qwen` (Qwen-VL, Qwen3.5,
LLaVA-OneVision-1.5, GLM-4V), `tiled` (Idefics3/SmolVLM, InternVL, Llama 4);
`_common` holds `HFTesterConfig` and what the builders share. This module
holds the registry, `TESTER_CONFIGS` and `BLOCK_TESTER_CONFIGS`, and exports
every name the tests import.

A new family's adapter is checked by adding its tester's values to its
family line's module and one more `HFTesterConfig` here;
``tests/adapters/test_hf_configs.py`` runs every entry.

Test support, not installed with the package (the suite is the only user;
tiny models for plugin authors stay in `embedlens.testing`).

Example:
    >>> from tests.support.hf_testers import TESTER_CONFIGS
    >>> model, processor = TESTER_CONFIGS["paligemma2"].build(0)
    >>> model.config.text_config.model_type, model.config.text_config.final_logit_softcapping
    ('gemma2', 30.0)
"""

from __future__ import annotations

from transformers import PreTrainedModel, ProcessorMixin

from tests.support.hf_testers._common import Builder, HFTesterConfig
from tests.support.hf_testers.gemma import (
    GEMMA3_TESTER,
    GEMMA4_TESTER,
    PALIGEMMA_TESTER,
    gemma3_builder,
    gemma4_builder,
    paligemma_builder,
)
from tests.support.hf_testers.llava import (
    LLAVA_NEXT_TESTER,
    LLAVA_NEXT_VIDEO_TESTER,
    LLAVA_TESTER,
    MISTRAL3_TESTER,
    ONEVISION_TESTER,
    PIXTRAL_TESTER,
    llava_builder,
    llava_next_builder,
    llava_next_video_builder,
    llava_pixtral_builder,
    mistral3_builder,
    onevision_builder,
)
from tests.support.hf_testers.molmo import MOLMO2_TESTER, molmo2_builder
from tests.support.hf_testers.qwen import (
    GLM4V_MOE_TESTER,
    GLM4V_TESTER,
    ONEVISION1_5_TESTER,
    QWEN2_5_VL_TESTER,
    QWEN2_VL_TESTER,
    QWEN3_5_3TO1_TESTER,
    QWEN3_5_TESTER,
    QWEN3_VL_MOE_TESTER,
    QWEN3_VL_TESTER,
    glm4v_builder,
    onevision1_5_builder,
    qwen_vl_builder,
)
from tests.support.hf_testers.tiled import (
    IDEFICS3_TESTER,
    INTERNVL_TESTER,
    LLAMA4_TESTER,
    idefics3_builder,
    internvl_builder,
    llama4_builder,
)

__all__ = [
    "BLOCK_TESTER_CONFIGS", "Builder", "GEMMA3_TESTER", "GEMMA4_TESTER", "GLM4V_MOE_TESTER", "GLM4V_TESTER",
    "HFTesterConfig", "IDEFICS3_TESTER", "INTERNVL_TESTER", "LLAMA4_TESTER", "LLAVA_NEXT_TESTER",
    "LLAVA_NEXT_VIDEO_TESTER", "LLAVA_TESTER", "MISTRAL3_TESTER", "MOLMO2_TESTER", "ONEVISION1_5_TESTER", "ONEVISION_TESTER",
    "PALIGEMMA_TESTER", "PIXTRAL_TESTER", "QWEN2_5_VL_TESTER", "QWEN2_VL_TESTER", "QWEN3_5_3TO1_TESTER",
    "QWEN3_5_TESTER", "QWEN3_VL_MOE_TESTER", "QWEN3_VL_TESTER", "TESTER_CONFIGS", "gemma3_builder",
    "gemma4_builder", "glm4v_builder", "hf_tester_model", "idefics3_builder", "internvl_builder", "llama4_builder",
    "llava_builder", "llava_next_builder", "llava_next_video_builder", "llava_pixtral_builder", "mistral3_builder", "molmo2_builder",
    "onevision1_5_builder", "onevision_builder", "paligemma_builder", "qwen_vl_builder",
]

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
        HFTesterConfig("molmo2", "molmo2", "Molmo2VisionText2TextModelTester (378-px crops of 14-px patches pooled "
                     "2 x 2 across crops, up to 8 crops + the low-res view; image tokens one bidirectional block)",
                     molmo2_builder(), image_sizes=((378, 378), (300, 500)), images_per_sample=2),
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

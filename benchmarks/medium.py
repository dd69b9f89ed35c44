"""A medium, randomly initialised LLaVA-1.5-shaped model built in code (no download).

LLaVA-1.5's shape at a size two CPU cores can run: a CLIP tower at 336 px with
14 px patches (576 visual tokens, LLaVA's feature layer -2 without CLS) or a
SigLIP tower at 384 px / 14 (729 tokens), a two-layer GELU projector, and a
Llama language model with hidden size 1024, 8 layers and a 32k vocabulary (or
Qwen's 152k). The tokenizer is embedlens's offline word-level one, padded with
filler words up to the vocabulary size, so every id has a token string.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from embedlens.tokenizer import CHARS, IMAGE_TOKEN, LATER_WORDS, LLAVA_CHAT_TEMPLATE, PUNCTUATION, SPECIAL_TOKENS, WORDS


@dataclass(frozen=True)
class MediumSpec:
    """Sizes of the medium model (defaults: LLaVA-1.5 shaped, CLIP tower, 32k vocabulary)."""

    tower: str = "clip"  # "clip" (336 px / 14: 576 tokens) or "siglip" (384 px / 14: 729 tokens)
    vocab_size: int = 32_000
    llm_hidden: int = 1024
    llm_layers: int = 8
    llm_intermediate: int = 2816  # Llama's 11/4 ratio
    llm_heads: int = 16
    vision_hidden: int = 768
    vision_layers: int = 6
    vision_intermediate: int = 3072
    vision_heads: int = 12

    @property
    def image_size(self) -> int:
        return 336 if self.tower == "clip" else 384

    @property
    def n_visual_tokens(self) -> int:
        return (self.image_size // 14) ** 2


def _tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *WORDS, *PUNCTUATION, *CHARS, *LATER_WORDS):
        vocab.setdefault(tok, len(vocab))
    for i in range(vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
         pre_tokenizers.Split(Regex(r"\w+|\n|[^\w\s]"), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, "<video>"]})
    return fast


def medium_model(spec: MediumSpec = MediumSpec(), seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build the medium model and its processor (float32 on the CPU by default; `device` and `dtype` build the
    weights where and as they are used, e.g. bf16 straight on a GPU: no float32 copy on the host)."""
    tok = _tokenizer(spec.vocab_size)
    vision = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                  image_size=spec.image_size, patch_size=14)
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if spec.tower == "clip":
        vision_config = CLIPVisionConfig(**vision)
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": spec.image_size},
                                                crop_size={"height": spec.image_size, "width": spec.image_size}, **norm)
        strategy, extra = "default", 1
    else:
        vision_config = SiglipVisionConfig(**vision)
        image_processor = SiglipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size}, **norm)
        strategy, extra = "full", 0
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=LlamaConfig(
            vocab_size=len(tok), hidden_size=spec.llm_hidden, intermediate_size=spec.llm_intermediate,
            num_hidden_layers=spec.llm_layers, num_attention_heads=spec.llm_heads, num_key_value_heads=spec.llm_heads,
            max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    if device == "cpu" and dtype == torch.float32:
        model = LlavaForConditionalGeneration(config).eval()
    else:
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy=strategy, num_additional_image_tokens=extra,
                               chat_template=tok.chat_template)
    return model, processor


def forward_flops(spec: MediumSpec, seq: int) -> dict[str, float]:
    """Matmul FLOPs of one image's forward, by part (2 x multiply-adds; attention scores included)."""
    t = spec.n_visual_tokens + (1 if spec.tower == "clip" else 0)
    vh, vi = spec.vision_hidden, spec.vision_intermediate
    vision = spec.vision_layers * 2 * t * (4 * vh * vh + 2 * vh * vi + 2 * t * vh)
    h, i = spec.llm_hidden, spec.llm_intermediate
    llm = spec.llm_layers * 2 * seq * (4 * h * h + 3 * h * i + 2 * seq * h)
    return {"vision": vision, "projector": 2 * spec.n_visual_tokens * (vh * h + h * h), "llm_layers": llm,
            "head": 2 * seq * h * spec.vocab_size, "lens_one_layer": 2 * spec.n_visual_tokens * h * spec.vocab_size}

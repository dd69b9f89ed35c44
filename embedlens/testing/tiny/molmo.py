"""Tiny model of Molmo2: a ViT on overlapping crops of the image (plus a low-res view), pooled by its adapter into a
Qwen3-style LM, with Molmo2's tokenizer and processor."""

from __future__ import annotations

import torch

from embedlens.testing.tiny._common import _NORM, _TEXT, TEXT_HIDDEN, _special_ids
from embedlens.tokenizer import build_tokenizer


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

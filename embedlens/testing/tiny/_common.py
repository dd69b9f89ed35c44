"""What every family's tiny model shares: image and patch sizes, the vision and text config values, the
normalisation, and the special-token ids a text config takes from the tokenizer."""

from __future__ import annotations

from typing import Callable

from transformers import PreTrainedModel, ProcessorMixin

#: A tiny model's builder: ``seed -> (model, processor)``.
Builder = Callable[[int], tuple[PreTrainedModel, ProcessorMixin]]

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


def _special_ids(tokenizer) -> dict:
    return dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)

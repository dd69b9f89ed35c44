"""Tiny, randomly initialised models of every supported family, built offline.

Each is a real Hugging Face class (`LlavaForConditionalGeneration`, ...) made
from a small config, with a word-level tokenizer and a real processor, so that
tests and demos exercise exactly the code paths a released checkpoint does.

One module per family line holds its builders and the tokenizers and
processors they share with tests: `llava` (LLaVA, LLaVA-NeXT, LLaVA-NeXT-Video,
LLaVA-OneVision, Mistral 3, LLaVA-Pixtral), `qwen` (Qwen-VL, Qwen3.5,
LLaVA-OneVision-1.5, GLM-4V), `gemma` (PaliGemma, Gemma 3, Gemma 4), `tiled`
(Idefics3/SmolVLM, InternVL, Llama 4), `molmo` (Molmo2); `_common` holds the sizes and config
values they all use. This module holds the registry (`TINY_SPECS`,
`TINY_ALIASES`), the public functions, and every name the builders' modules
define, so ``from embedlens.testing.tiny import NAME`` keeps working.

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

from transformers import PreTrainedModel, ProcessorMixin

from embedlens.testing.tiny._common import (  # noqa: F401 - re-exported: tests and tools import them from here
    _NORM,
    _TEXT,
    _VISION,
    GRID,
    IMAGE_SIZE,
    PATCH_SIZE,
    TEXT_HIDDEN,
    Builder,
    _special_ids,
)
from embedlens.testing.tiny.gemma import (  # noqa: F401
    GEMMA3_TOKENS,
    GEMMA4_TOKENS,
    _gemma3,
    _gemma4,
    _paligemma,
    gemma4_ids,
    gemma4_processor,
    gemma4_tokenizer,
)
from embedlens.testing.tiny.llava import (  # noqa: F401
    MISTRAL3_LONGEST_EDGE,
    MISTRAL3_PATCH,
    MISTRAL3_TOKENS,
    _llava,
    _llava_next,
    _llava_next_video,
    _llava_pixtral,
    _mistral3,
    _onevision,
    mistral3_processor,
    mistral3_tokenizer,
)
from embedlens.testing.tiny.molmo import _molmo2, molmo2_processor, molmo2_tokenizer  # noqa: F401
from embedlens.testing.tiny.qwen import (  # noqa: F401
    GLM4V_TOKENS,
    QWEN_PATCH,
    QWEN_TOKENS,
    _glm4v,
    _glm4v_moe,
    _onevision1_5,
    _qwen3_5,
    _qwen3_vl_moe,
    _qwen_vl,
    glm4v_ids,
    glm4v_image_processor,
    glm4v_tokenizer,
    qwen_ids,
    qwen_image_processor,
    qwen_tokenizer,
)
from embedlens.testing.tiny.tiled import (  # noqa: F401
    INTERNVL_TOKENS,
    LLAMA4_TOKENS,
    _idefics3_family,
    _internvl,
    _llama4,
    llama4_processor,
    llama4_tokenizer,
)

__all__ = ["TINY_ALIASES", "TINY_SPECS", "TinySpec", "canonical_tiny_name", "save_tiny_model", "tiny_batch", "tiny_model"]



@dataclass(frozen=True)
class TinySpec:
    """One tiny configuration: a family, its vision tower, and how to build it.

    `name` (``tiny:NAME``) is the family's adapter name (`family`, its ``model.adapter`` key), or
    ``FAMILY-TOWER`` where one family has tiny models with different towers (``llava-clip``, ``llava-siglip``).
    """

    name: str
    family: str
    tower: str
    build: Builder


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

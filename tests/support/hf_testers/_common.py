"""What every family's tester configuration shares: `HFTesterConfig`, the `Builder` type, the special-token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transformers import PreTrainedModel, ProcessorMixin

Builder = Callable[[int], tuple[PreTrainedModel, ProcessorMixin]]
_NORM = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


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

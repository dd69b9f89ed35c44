"""Shared by the tests of the in-LLM token-reduction methods: one tiny model, a batch, and its eager twin."""

from __future__ import annotations

import functools

import torch

from embedlens.data import Sample
from embedlens.testing.images import noise, shapes

FAMILY = "llava-clip"  # 4 LLM layers, 4 heads, Llama attention (the references' own architecture)


@functools.cache
def models():
    from embedlens.adapters import load_model

    return load_model(f"tiny:{FAMILY}"), load_model(f"tiny:{FAMILY}", attn_implementation="eager")


def samples() -> list[Sample]:
    return [
        Sample([shapes(64, seed=1)], question="what is it?", id="a"),
        Sample([noise(40, 70, seed=2)], question="what colour is the big square on the left?", id="b"),
        Sample([shapes(48, seed=3)], question="count", id="c"),
    ]


def eager_outputs(batch):
    """The eager model's attentions and hidden states on `batch` (the independent side of the tests)."""
    _, eager = models()
    with torch.no_grad():
        return eager.model(**eager.model_inputs(batch), position_ids=eager.position_ids(batch.inputs),
                           output_attentions=True, output_hidden_states=True)


def kept_after(ctx, layer: int) -> torch.Tensor:
    """`[batch, seq]` bool: the visual tokens still present in `layer`."""
    return ctx.present(layer) & ctx.roles.visual

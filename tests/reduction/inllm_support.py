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


def causal_mask(n: int, dtype) -> torch.Tensor:
    """`[1, 1, n, n]` additive causal mask (the rows are in sequence order)."""
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(1, 1, n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def eager_layer_attention(eager, layer: int, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The eager Hugging Face layer's own attention probabilities `[heads, n, n]` on its input `h` `[1, n, d]` at
    position ids `pos` `[n]` (its norm, projections, rotary and softmax; nothing recomputed by embedlens)."""
    lm = eager.model.model.language_model
    block = lm.layers[layer]
    pe = lm.rotary_emb(h, pos[None])
    with torch.no_grad():
        _, weights = block.self_attn(hidden_states=block.input_layernorm(h), position_embeddings=pe,
                                     attention_mask=causal_mask(h.shape[1], h.dtype))
    return weights[0]


def eager_layer(eager, layer: int, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One eager Hugging Face decoder layer on `h` `[1, n, d]` at position ids `pos` `[n]`."""
    lm = eager.model.model.language_model
    pe = lm.rotary_emb(h, pos[None])
    with torch.no_grad():
        out = lm.layers[layer](h, attention_mask=causal_mask(h.shape[1], h.dtype), position_ids=pos[None],
                               position_embeddings=pe)
    return out[0] if isinstance(out, tuple) else out

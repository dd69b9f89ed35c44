"""Similarities are computed in float32 under a bf16/fp16 model: neighbours a half-precision product would tie are told apart."""

from __future__ import annotations

import math

import pytest
import torch

from embedlens.signals import similarity_entropy
from embedlens.vocab import nearest_vocab


def _planted(dtype: torch.dtype):
    """Rows all within ~1e-3 cosine of one direction: half-precision cosines (steps of 2^-8 near 1) tie most of them."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, generator=g)
    vocab = (base + 0.03 * torch.randn(300, 256, generator=g)).to(dtype)
    x = (base + 0.03 * torch.randn(20, 256, generator=g)).to(dtype)
    return x, vocab


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nearest_vocab_ranks_by_float32_similarity(dtype):
    x, vocab = _planted(dtype)
    ref = torch.nn.functional.normalize(x.double(), dim=-1) @ torch.nn.functional.normalize(vocab.double(), dim=-1).T  # [20, 300]
    half = (torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(vocab, dim=-1).T)
    assert (half.argmax(-1) != ref.argmax(-1)).any()  # the trap is real: a half-precision search gets some wrong
    scores, ids = nearest_vocab(x, vocab, 3, chunk_size=64)
    assert scores.dtype == torch.float32
    assert torch.equal(ids[:, 0], ref.argmax(-1))
    assert torch.allclose(scores.double(), ref.topk(3, dim=-1).values, atol=1e-6)


def test_similarity_entropy_is_float32_and_matches_a_float64_reference():
    x, vocab = _planted(torch.bfloat16)
    ent = similarity_entropy(x, vocab, 0.05, 64)
    assert ent.dtype == torch.float32
    sims = torch.nn.functional.normalize(x.double(), dim=-1) @ torch.nn.functional.normalize(vocab.double(), dim=-1).T
    p = (sims / 0.05).softmax(-1)
    ref = -(p * p.log()).sum(-1)
    assert torch.allclose(ent.double(), ref, atol=1e-4)
    assert float(ent.max()) <= math.log(vocab.shape[0]) + 1e-4

"""The fast exact vocabulary search: bf16 candidates, a float32 re-rank, and a proof that the top-k is float32's.

Each test compares with the plain float32 search (`nearest_vocab(..., fast=False)`) and, for the ranking,
with a float64 reference where rows are near-tied.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedlens.adapters import load_model
from embedlens.data import Sample
from embedlens.probes.embedding_lens import lens_site
from embedlens.testing.images import shapes
from embedlens.tracing import collect
from embedlens.vocab import FAST_CANDIDATES, certified_candidates, nearest_vocab


def _cos64(x: torch.Tensor, vocab: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float64 cosines of each query with the rows `ids` ([tokens, k])."""
    return torch.einsum("td,tkd->tk", F.normalize(x.double(), dim=-1), F.normalize(vocab.double(), dim=-1)[ids])


def _same_topk(x: torch.Tensor, vocab: torch.Tensor, k: int, chunk_size: int = 512) -> torch.Tensor:
    """Asserts the fast search returns float32's ids and scores; returns the share of tokens the proof certified.

    Two rows whose cosines agree to float32 rounding (duplicates, or equal to ~1e-7) are a tie: the float32
    search itself orders them by how its product happened to round, so there either may come first; every
    other position must hold the same id.
    """
    ref_s, ref_i = nearest_vocab(x, vocab, k, chunk_size, fast=False)
    s, i = nearest_vocab(x, vocab, k, chunk_size, fast=True)
    assert torch.allclose(s, ref_s, atol=1e-6, rtol=0)
    differ = i != ref_i
    assert torch.allclose(_cos64(x, vocab, i)[differ], _cos64(x, vocab, ref_i)[differ], atol=2e-6, rtol=0)
    assert differ.float().mean() < 0.01
    return certified_candidates(F.normalize(x.float(), dim=-1), vocab, k, chunk_size)[2].float().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_and_clustered_matrices(dtype):
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(6000, 256, generator=g) * 0.02
    centres = torch.randn(300, 256, generator=g)
    clustered = centres[torch.randint(300, (6000,), generator=g)] + 0.3 * torch.randn(6000, 256, generator=g)
    for vocab, queries in ((gauss, torch.randn(300, 256, generator=g)),
                           (clustered, torch.randn(300, 256, generator=g)),
                           (clustered, clustered[:300] + 0.05 * torch.randn(300, 256, generator=g))):
        assert _same_topk(queries.to(dtype), vocab.to(dtype), 5) > 0.9  # the proof, not the fallback, carries it


@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip", "tiny-llava-clip-planted"])
def test_zoo_models_every_layer(name):
    adapter = load_model(f"zoo:{name}")
    batch = adapter.encode([Sample([shapes(64, seed=i)], question="what is in the picture?") for i in range(2)])
    layers = range(adapter.n_llm_layers + 1)
    acts = collect(adapter, batch, [lens_site(layer) for layer in layers])
    vt = batch.roles.visual_tokens()
    x = torch.cat([acts[lens_site(layer)][vt["sample"], vt["position"]] for layer in layers])  # [layers * tokens, d]
    for matrix in (adapter.input_embeddings(), adapter.output_embeddings()):
        if matrix.shape[0] <= 3 + FAST_CANDIDATES:
            pytest.skip(f"{name}: vocabulary of {matrix.shape[0]} rows is searched in float32 directly")
        _same_topk(x, matrix.detach(), 3, chunk_size=128)


def _near_ties(n_tied: int, gap: float, seed: int = 0):
    """Queries with `n_tied` rows at cosines spaced `gap` apart just below 0.9 (far below bf16's resolution of
    ~4e-3 there), and 3000 rows far away."""
    g = torch.Generator().manual_seed(seed)
    d = 128
    x = F.normalize(torch.randn(8, d, generator=g), dim=-1)
    rows = []
    for t in range(8):
        ortho = torch.randn(n_tied, d, generator=g)
        ortho = F.normalize(ortho - (ortho @ x[t])[:, None] * x[t], dim=-1)
        cos = 0.9 - gap * torch.randperm(n_tied, generator=g).double()
        rows.append(cos.float()[:, None] * x[t] + (1 - cos**2).sqrt().float()[:, None] * ortho)
    far = torch.randn(3000, d, generator=g) * 0.05
    vocab = torch.cat([*rows, far])[torch.randperm(8 * n_tied + 3000, generator=g)]
    return x, vocab


@pytest.mark.parametrize("gap", [1e-4, 1e-5])
def test_adversarial_near_ties_are_ranked_as_float32(gap):
    x, vocab = _near_ties(n_tied=20, gap=gap)
    exact = (x.double() @ F.normalize(vocab.double(), dim=-1).T).topk(5, dim=-1).indices
    bf16 = (x.bfloat16() @ F.normalize(vocab, dim=-1).bfloat16().T).float().topk(5, dim=-1).indices
    assert not torch.equal(bf16, exact)  # the trap is real: bf16 scores alone misorder them
    s, i = nearest_vocab(x, vocab, 5, 512, fast=True)
    assert torch.equal(i, exact)
    assert _same_topk(x, vocab, 5) == 1.0  # 20 tied rows fit in the candidates: proven without the fallback


def test_more_near_ties_than_candidates_are_refused_by_the_proof_and_searched_in_float32():
    x, vocab = _near_ties(n_tied=3 * FAST_CANDIDATES, gap=1e-5)
    _, _, certified = certified_candidates(x, vocab, 5, 512)
    assert not certified.any()  # the bound cannot separate the candidates from 190 rows within 2e-3
    exact = (x.double() @ F.normalize(vocab.double(), dim=-1).T).topk(5, dim=-1).indices
    assert torch.equal(nearest_vocab(x, vocab, 5, 512, fast=True)[1], exact)
    assert _same_topk(x, vocab, 5) == 0.0


def test_duplicate_rows_give_the_same_scores_and_ids():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2000, 64, generator=g)
    vocab = torch.cat([base, base[:50]])  # rows 2000.. repeat rows 0..49 exactly
    x = base[:50] + 0.01 * torch.randn(50, 64, generator=g)
    ref_s, ref_i = nearest_vocab(x, vocab, 4, 256, fast=False)
    s, i = nearest_vocab(x, vocab, 4, 256, fast=True)
    assert torch.allclose(s, ref_s, atol=1e-6, rtol=0)
    assert (i[:, :2] % 2000 == torch.arange(50)[:, None]).all() and (i[:, 0] != i[:, 1]).all()  # the pair, either order
    assert torch.allclose(_cos64(x, vocab, i), _cos64(x, vocab, ref_i), atol=2e-6, rtol=0)  # same rows up to ties


def test_cpu_default_is_the_float32_search_and_small_vocabularies_skip_the_candidates():
    g = torch.Generator().manual_seed(4)
    vocab, x = torch.randn(40, 16, generator=g), torch.randn(5, 16, generator=g)
    assert torch.equal(nearest_vocab(x, vocab, 3, fast=True)[1], nearest_vocab(x, vocab, 3)[1])
    with pytest.raises(ValueError, match="needs more than"):
        certified_candidates(F.normalize(x, dim=-1), vocab, 3)

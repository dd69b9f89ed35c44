"""Approximate vocabulary search: exact whenever the true neighbours are candidates; recall measured."""

from __future__ import annotations

import sys

import pytest
import torch

from embedlens.errors import EmbedLensError, PlanError
from embedlens.probes.embedding_lens import EmbeddingLens
from embedlens.vocab import nearest_vocab
from embedlens.vocab_index import VocabIndex, clear_cache, default_n_lists, recall_at_k, vocab_index
from embedlens.tracing import collect
from tests.conftest import mixed_samples

pytest.importorskip("faiss")


def _brute(x: torch.Tensor, vocab: torch.Tensor, k: int):
    sims = torch.nn.functional.normalize(x.double(), dim=-1) @ torch.nn.functional.normalize(vocab.double(), dim=-1).T
    return sims.topk(k, dim=-1)


def _clustered(n_vocab: int, d: int, n_clusters: int, n_queries: int, seed: int = 0):
    """A vocabulary in tight clusters (as real embedding matrices are), and queries near vocabulary rows."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g)
    vocab = centres[torch.randint(n_clusters, (n_vocab,), generator=g)] + 0.3 * torch.randn(n_vocab, d, generator=g)
    queries = vocab[torch.randint(n_vocab, (n_queries,), generator=g)] + 0.1 * torch.randn(n_queries, d, generator=g)
    return vocab, queries


def test_probing_every_list_is_exact():
    g = torch.Generator().manual_seed(1)
    vocab, x = torch.randn(800, 12, generator=g) * 3, torch.randn(40, 12, generator=g)
    n_lists = vocab_index(vocab).n_lists
    scores, ids = nearest_vocab(x, vocab, k=4, search="approximate", n_probe=n_lists)
    ref_s, ref_i = _brute(x, vocab, 4)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(scores.double(), ref_s, atol=1e-6, rtol=1e-6)


def test_few_lists_exact_where_neighbours_are_candidates_and_recall_is_the_candidate_coverage():
    vocab, x = _clustered(n_vocab=4000, d=32, n_clusters=60, n_queries=300)
    k, n_probe, n_cand = 3, 2, 16
    scores, ids = nearest_vocab(x, vocab, k=k, search="approximate", n_probe=n_probe, n_candidates=n_cand)
    ref_s, ref_i = _brute(x, vocab, k)
    cand = vocab_index(vocab).candidates(torch.nn.functional.normalize(x, dim=-1), n_cand, n_probe)
    covered = (ref_i[:, :, None] == cand[:, None, :]).any(-1)  # [queries, k]: true neighbour among the candidates
    full = covered.all(-1)
    assert full.sum() > 0.9 * len(full)
    assert torch.equal(ids[full], ref_i[full])  # exact top-k, order included, wherever all neighbours were candidates
    torch.testing.assert_close(scores[full].double(), ref_s[full], atol=1e-6, rtol=1e-6)
    recall = recall_at_k(ids, ref_i)
    assert recall == pytest.approx(covered.float().mean().item())  # the re-rank loses nothing it was given
    print(f"recall@{k} with {n_probe}/{vocab_index(vocab).n_lists} lists probed: {recall:.4f}")


def test_cell_by_cell_scan_returns_the_top_rows_of_exactly_the_probed_cells():
    """The candidates equal a brute force over the rows of each query's n_probe cells (cells by inner product
    with the k-means centroids, rows assigned to their best centroid): the batched scan loses and adds nothing."""
    vocab, x = _clustered(n_vocab=3000, d=24, n_clusters=40, n_queries=150, seed=4)
    index = VocabIndex(vocab, n_lists=30)
    rows = torch.nn.functional.normalize(vocab, dim=-1)
    cell_of_row = (rows @ index.centroids.T).argmax(-1)
    xn = torch.nn.functional.normalize(x, dim=-1)
    for n_probe, n_cand in ((1, 5), (3, 12), (30, 7)):
        got = index.candidates(xn, n_cand, n_probe)
        probed = (xn @ index.centroids.T).topk(n_probe, dim=-1).indices
        for q in range(len(x)):
            allowed = torch.isin(cell_of_row, probed[q]).nonzero().flatten()
            want = allowed[(rows[allowed] @ xn[q]).topk(min(n_cand, len(allowed))).indices]
            assert set(got[q][got[q] >= 0].tolist()) == set(want.tolist()), (n_probe, q)
    assert index.offsets[-1] == len(vocab) and sorted(index.row_ids.tolist()) == list(range(len(vocab)))


def test_default_n_probe_is_a_fixed_share_of_the_lists():
    from embedlens.vocab_index import default_n_probe

    assert [default_n_probe(n) for n in (5, 100, default_n_lists(32_000), default_n_lists(152_064))] == [5, 8, 8, 18]


def test_random_matrix_has_no_structure_to_exploit_and_recall_says_so():
    """On a Gaussian matrix one probed list of many misses most neighbours: recall is measured, not assumed."""
    g = torch.Generator().manual_seed(2)
    vocab, x = torch.randn(4000, 64, generator=g), torch.randn(200, 64, generator=g)
    _, ids = nearest_vocab(x, vocab, k=3, search="approximate", n_probe=1)
    assert recall_at_k(ids, _brute(x, vocab, 3)[1]) < 0.5


def test_index_is_built_once_per_matrix_and_rebuilt_when_it_changes():
    clear_cache()
    g = torch.Generator().manual_seed(3)
    vocab = torch.randn(500, 8, generator=g)
    first = vocab_index(vocab)
    assert vocab_index(vocab.detach()) is first  # a detached view of the same weights: same index
    vocab.mul_(-1)  # an in-place edit (a steering experiment, a loaded checkpoint) must not reuse it
    assert vocab_index(vocab) is not first
    assert default_n_lists(500) == 12 and default_n_lists(32_000) == 358


def test_lens_rows_with_every_list_probed_equal_exact_ones(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter))
    exact = EmbeddingLens(k=3, layers=[0, -1])
    acts = collect(adapter, batch, exact.sites(adapter))
    n_lists = vocab_index(adapter.input_embeddings().detach()).n_lists
    approx = EmbeddingLens(k=3, layers=[0, -1], search="approximate", n_probe=n_lists)
    a, e = approx.update(adapter, batch, acts)["tokens"], exact.update(adapter, batch, acts)["tokens"]
    for j in (1, 2, 3):
        assert list(a[f"id_{j}"]) == list(e[f"id_{j}"])
        torch.testing.assert_close(torch.tensor(a[f"score_{j}"]), torch.tensor(e[f"score_{j}"]), atol=1e-6, rtol=1e-6)
    assert approx.result()["search"] == "approximate"


def test_bad_search_parameters_and_missing_faiss_are_named(monkeypatch):
    with pytest.raises(PlanError, match=r"embedding_lens.search must be one of \['exact', 'approximate'\]; got 'fuzzy'"):
        EmbeddingLens(search="fuzzy")
    with pytest.raises(PlanError, match="embedding_lens.n_probe must be >= 1; got 0"):
        EmbeddingLens(search="approximate", n_probe=0)
    with pytest.raises(EmbedLensError, match="n_lists must be in 1..10"):
        VocabIndex(torch.randn(10, 4), n_lists=11)
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    with pytest.raises(PlanError, match=r"embedding_lens.search: 'approximate' needs FAISS.*embedlens\[fast\]"):
        EmbeddingLens(search="approximate")
    EmbeddingLens(search="exact")  # exact search never needs it

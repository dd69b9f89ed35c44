"""The shared per-pass vocabulary search (`embedlens.vocab.visual_nearest`)."""

from __future__ import annotations

import torch

import embedlens.vocab as vocab_mod
from embedlens.groups import Partition
from embedlens.probes.embedding_lens import EmbeddingLens
from embedlens.sites import Site
from embedlens.tracing import collect
from tests.conftest import get_adapter, mixed_samples


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = vocab_mod.nearest_vocab

    def counted(x, vocab, k, *a, **kw):
        calls.append(x.shape[0])
        return real(x, vocab, k, *a, **kw)

    # every module that could call the search directly, not only through the memo
    import embedlens.anchors
    import embedlens.groups
    import embedlens.probes.embedding_lens

    for mod in (vocab_mod, embedlens.groups, embedlens.anchors, embedlens.probes.embedding_lens):
        monkeypatch.setattr(mod, "nearest_vocab", counted, raising=False)
    return calls


def test_lens_and_partition_of_one_pass_search_once_and_agree_with_an_independent_search(monkeypatch):
    adapter = get_adapter("llava-clip")
    batch = adapter.encode(mixed_samples(adapter=adapter))
    vocab = adapter.input_embeddings().detach()
    lens = EmbeddingLens(k=3, layers=[0])
    part = Partition({"dead": [5, 6, 7]}, k=3)
    acts = collect(adapter, batch, {*lens.sites(adapter), *part.sites(adapter)})
    calls = _counting(monkeypatch)
    rows = lens.update(adapter, batch, acts)["tokens"]
    flags = part.rules(adapter, batch, acts)["anchors:dead"]
    assert len(calls) == 1  # one search for both

    # independent: brute-force cosine over the whole matrix, no chunks, no memo
    vt = batch.roles.visual_tokens()
    x = acts[Site("llm.embed")][vt["sample"], vt["position"]].float()
    sims = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(vocab.float(), dim=-1).T
    top = sims.topk(3, dim=-1).indices
    assert list(rows["id_1"]) == top[:, 0].tolist()
    assert flags.tolist() == torch.isin(top, torch.tensor([5, 6, 7])).any(-1).tolist()


def test_new_activations_or_another_k_are_searched_again(monkeypatch):
    adapter = get_adapter("llava-clip")
    batch = adapter.encode(mixed_samples(adapter=adapter))
    vocab = adapter.input_embeddings().detach()
    site = Site("llm.embed")
    h = collect(adapter, batch, [site])[site]
    calls = _counting(monkeypatch)
    s1, i1 = vocab_mod.visual_nearest(batch, site, h, vocab, 3)
    vocab_mod.visual_nearest(batch, site, h, vocab, 3)
    assert len(calls) == 1
    vocab_mod.visual_nearest(batch, site, h, vocab, 2)  # another k
    assert len(calls) == 2
    shifted = h + 1.0  # another pass's activations for the same batch: never the stale result
    s2, i2 = vocab_mod.visual_nearest(batch, site, shifted, vocab, 3)
    assert len(calls) == 3
    assert not torch.equal(s1, s2)

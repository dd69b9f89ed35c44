"""The embedding lens against a brute-force float64 computation."""

from __future__ import annotations

import pytest
import torch

from embedlens.errors import PlanError
from embedlens.probes.embedding_lens import EmbeddingLens, lens_site
from embedlens.vocab import nearest_vocab
from embedlens.sites import Site
from embedlens.tracing import collect
from tests.conftest import mixed_samples


def _brute(x: torch.Tensor, vocab: torch.Tensor, k: int):
    x, v = x.double(), vocab.double()
    sims = torch.empty(x.shape[0], v.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):  # deliberately naive
        for j in range(v.shape[0]):
            denom = x[i].norm() * v[j].norm()
            # an all-zero row (e.g. the padding embedding) has similarity 0 to everything
            sims[i, j] = (x[i] @ v[j]) / denom if denom > 0 else 0.0
    return sims.topk(k, dim=-1)


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 1000])
def test_nearest_vocab_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    x, vocab = torch.randn(9, 6, generator=g), torch.randn(50, 6, generator=g)
    scores, ids = nearest_vocab(x, vocab, k=4, chunk_size=chunk_size)
    ref_s, ref_i = _brute(x, vocab, 4)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(scores.double(), ref_s, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("matrix", ["input", "output"])
def test_probe_rows_match_brute_force(adapter, matrix):
    batch = adapter.encode(mixed_samples(adapter=adapter), padding_side="left")
    n = adapter.n_llm_layers
    lens = EmbeddingLens(k=3, layers=[0, 1, -1], matrix=matrix, chunk_size=97)
    acts = collect(adapter, batch, lens.sites(adapter))
    rows = lens.update(adapter, batch, acts)["tokens"]
    vocab = adapter.input_embeddings() if matrix == "input" else adapter.output_embeddings()
    vt = batch.roles.visual_tokens()
    m = len(vt["sample"])
    assert len(rows["sample"]) == 3 * m
    rows = {c: list(v) for c, v in rows.items()}  # numpy columns, compared as lists
    assert rows["layer"] == [0] * m + [1] * m + [n] * m
    for li, layer in enumerate([0, 1, n]):
        h = acts[lens_site(layer)][vt["sample"], vt["position"]].detach()
        ref_s, ref_i = _brute(h, vocab.detach(), 3)
        sl = slice(li * m, (li + 1) * m)
        for j in range(3):
            assert rows[f"id_{j + 1}"][sl] == ref_i[:, j].tolist()
            torch.testing.assert_close(torch.tensor(rows[f"score_{j + 1}"][sl]).double(), ref_s[:, j], atol=1e-5, rtol=1e-5)
        assert rows["row"][sl] == vt["row"].tolist() and rows["col"][sl] == vt["col"].tolist()
    assert rows["token_1"][:m] == adapter.tokenizer.convert_ids_to_tokens(rows["id_1"][:m])
    # the summary's most frequent nearest ids come decoded, with counts from the brute-force top-1
    from collections import Counter

    top = lens.result()["most_frequent_top1_ids"]["0"]
    want = Counter(_brute(acts[lens_site(0)][vt["sample"], vt["position"]].detach(), vocab.detach(), 1)[1][:, 0].tolist())
    assert {(e["id"], e["count"]) for e in top} <= set(want.items()) and top[0]["count"] == max(want.values())
    assert all(e["token"] == adapter.tokenizer.convert_ids_to_tokens(e["id"]) for e in top)


def test_layer_zero_is_the_projector_output(adapter):
    """At layer 0 the visual rows are the visual tokens themselves."""
    batch = adapter.encode(mixed_samples(adapter=adapter)[:1])
    acts = collect(adapter, batch, ["llm.embed", "projector"])
    vis = acts[lens_site(0)][batch.roles.visual]
    if adapter.name == "molmo2":  # it adds each token's feature to the embedding of its <im_patch> token
        vis = vis - adapter.model.get_input_embeddings()(batch.input_ids[batch.roles.visual])
    vt = batch.roles.visual_tokens()
    proj = acts[Site("projector")][vt["feature_row"], vt["feature_col"]]
    cos = torch.nn.functional.cosine_similarity(vis, proj, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-5, rtol=0)


def test_bad_parameters_are_named(adapter):
    with pytest.raises(PlanError, match=r"embedding_lens.layers: layer 9 is out of range .*0\.\.4"):
        EmbeddingLens(layers=[9]).check(adapter)
    with pytest.raises(PlanError, match=r"embedding_lens.figure_layer: 2 must be one of layers \[0, 1\]"):
        EmbeddingLens(layers=[0, 1], figure_layer=2).check(adapter)
    with pytest.raises(PlanError, match="embedding_lens.k must be >= 1; got 0"):
        EmbeddingLens(k=0)
    with pytest.raises(PlanError, match="matrix must be 'input' or 'output'; got 'middle'"):
        EmbeddingLens(matrix="middle")


def test_layer_summary_per_group_from_the_rows():
    """The layer-by-layer summary (top-1 words, content-word share, agreement with the last layer) per planted group,
    recomputed from the probe's own token rows and the samples' ground truth."""
    from collections import Counter

    from embedlens.adapters import load_model
    from embedlens.synthetic import SyntheticSpec, make_records

    adapter = load_model("tiny:llava-clip")
    records = make_records(SyntheticSpec(n=3, seed=2, size=64), model=adapter)
    samples = [r.load(None)[0] for r in records]
    batch = adapter.encode(samples, padding_side="left")
    vt = batch.roles.visual_tokens()
    even = torch.zeros_like(batch.roles.visual)
    even[vt["sample"], vt["position"]] = vt["position"] % 2 == 0
    batch.groups = {"even": even, "odd": batch.roles.visual & ~even}
    lens = EmbeddingLens(k=1, layers=[0, 1, -1])
    rows = lens.update(adapter, batch, collect(adapter, batch, lens.sites(adapter)))["tokens"]
    # plant a content word: the first sample's image "has" the word its first token lands on at layer 0
    plain = lambda t: t.replace("\u2581", " ").replace("\u0120", " ").strip().lower()  # noqa: E731
    samples[0].meta["word"] = plain(rows["token_1"][0])
    lens = EmbeddingLens(k=1, layers=[0, 1, -1])
    rows = lens.update(adapter, batch, collect(adapter, batch, lens.sites(adapter)))["tokens"]
    summary = lens.result()["layer_summary"]
    n = adapter.n_llm_layers
    assert summary["final_layer"] == n and set(summary["groups"]) == {"all", "even", "odd"}
    m = len(vt["sample"])
    final = rows["token_1"][2 * m:]
    for li, layer in enumerate([0, 1, n]):
        toks = rows["token_1"][li * m:(li + 1) * m]
        for g in ("all", "even", "odd"):
            keep = [i for i in range(m) if g == "all" or (rows["position"][i] % 2 == 0) == (g == "even")]
            want = Counter(toks[i] for i in keep)
            got = summary["groups"][g][str(layer)]
            assert got["n_tokens"] == len(keep)
            assert got["top1"][0]["count"] == max(want.values()) and all(want[e["token"]] == e["count"] for e in got["top1"])
            assert got["agrees_with_final_layer"] == pytest.approx(sum(toks[i] == final[i] for i in keep) / len(keep))
            words = []
            for s in samples:
                pl = s.meta["patch_labels"]
                words.append({str(v).lower() for k in ("colour", "shape") for row in pl[k] for v in row if v} | {s.meta["word"].lower()} if s.meta.get("word") else
                             {str(v).lower() for k in ("colour", "shape") for row in pl[k] for v in row if v})
            share = sum(plain(toks[i]) in words[rows["sample"][i]] for i in keep) / len(keep)
            assert got["content_word_share"] == pytest.approx(share)
    assert summary["groups"]["all"]["0"]["content_word_share"] > 0  # the planted word counts
    assert summary["groups"]["all"][str(n)]["agrees_with_final_layer"] == 1.0

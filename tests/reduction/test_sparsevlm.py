"""`sparsevlm`: SparseVLM's raters, kept tokens and recycled tokens equal the authors' own functions on the same
tensors (`tests/reduction/reference/sparsevlm_reference.py`, copied under Apache-2.0 from Gumpest/SparseVLMs at
26a5f48: score.py:4-46, utils.py:159-239, modelling_sparse_llama.py:200-204).

On the tiny model the first stage is compared: the reference's later stages run on a sequence whose position
ids it renumbers (version 1.0), which `sparsevlm` does not (the documented difference), so from the second stage
on the two runs see different hidden states; those stages are checked on planted scores instead.
"""

from __future__ import annotations

import pytest
import torch

from embedlens.errors import InterventionError
from embedlens.interventions import Engine
from embedlens.reduction.sparsevlm import SparseVLM, dpc_knn_merge, rater_mask, sparsevlm_schedule
from tests.reduction.inllm_support import eager_outputs, kept_after, models, samples
from tests.reduction.reference import sparsevlm_reference as ref


def test_the_authors_table_and_their_logged_count():
    # 64 of 576: stages keep 66, 30, 17 (score.py:14); with the merged tokens 66+16, 30+2, 17+1 after layers 2, 6, 15;
    # the reference logs each layer's count after its own drop: (2*576 + 4*82 + 9*32 + 17*18) / 32
    acc = SparseVLM(keep=64).accounting(576, 32)
    assert acc["tokens_per_layer"] == [576] * 3 + [82] * 4 + [32] * 9 + [18] * 16
    assert acc["equivalent_tokens"] == pytest.approx((2 * 576 + 4 * 82 + 9 * 32 + 17 * 18) / 32)
    assert sparsevlm_schedule(576, 192, 32, [2, 6, 15]) == (300, 200, 110)
    # a budget outside the table: a scaled row, its logged mean within a token of the budget and not above it
    for n, k in ((576, 100), (36, 12), (2880, 640)):
        acc = SparseVLM(keep=k).accounting(n, 32)
        assert k - 1 <= acc["equivalent_tokens"] <= k
    no_recycling = SparseVLM(keep=64, recycle=False).accounting(576, 32)
    assert no_recycling["equivalent_tokens"] <= 64


def test_bad_parameters_are_refused():
    with pytest.raises(InterventionError, match="keep: "):
        SparseVLM(keep="64")
    with pytest.raises(InterventionError, match="layers: "):
        SparseVLM(keep=4, layers=[2, 2])
    with pytest.raises(InterventionError, match="layers: SparseVLM has at most 3 stages"):
        SparseVLM(keep=4, layers=[1, 2, 3, 4])
    with pytest.raises(InterventionError, match="recycle: "):
        SparseVLM(keep=4, recycle="yes")
    with pytest.raises(InterventionError, match="layers: SparseVLM drops after a layer in 0..2"):
        SparseVLM(keep=4, layers=[1, 3]).check(models()[0])


def test_raters_equal_the_reference():
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 30, 16, generator=gen)
    visual = torch.zeros(1, 30, dtype=torch.bool)
    visual[0, 3:19] = True
    text = torch.zeros_like(visual)
    text[0, 19:] = True
    expected = set((ref.select_raters(embeds, 3, 19)[1] + 19).tolist())
    assert set(rater_mask(embeds, visual, text)[0].nonzero().flatten().tolist()) == expected
    assert 0 < len(expected) < 11


def test_planted_clusters_merge_as_the_reference():
    # three tight blobs of 7, 5 and 3 tokens, far apart: 3 clusters, their means (the blob centres) are the merged
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    sizes = [7, 5, 3]
    x = torch.cat([c + 0.01 * torch.randn(s, 4, generator=gen) for c, s in zip(centres, sizes)])[torch.randperm(15, generator=gen)]
    torch.manual_seed(0)  # the reference's 1e-6 density noise
    expected = ref.cluster_and_merge(x[None], 3)[0]
    is_centre, merged = dpc_knn_merge(x[None], torch.ones(1, 15, dtype=torch.bool), torch.tensor([3]))
    got = merged[0][is_centre[0]]
    assert got.shape == (3, 4)
    order = lambda t: t[t.argmax(dim=1).argsort()]  # noqa: E731 - each blob has its own axis
    torch.testing.assert_close(order(got), order(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(order(got), centres, atol=0.02, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unstructured_tokens_merge_as_the_reference(seed):
    """Tokens without blobs, so which tokens become centres (density, distance to a denser token) decides every
    merged token: the same centres' cluster means as the reference, also with padding after a row's tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 40, 6, generator=gen, dtype=torch.float64)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 31:] = False  # the second row holds 31 tokens
    is_centre, merged = dpc_knn_merge(x, valid, torch.tensor([4, 3]))
    for row, (n, k) in enumerate([(40, 4), (31, 3)]):
        torch.manual_seed(0)  # the reference's 1e-6 density noise (distinct densities here: it decides nothing)
        expected = ref.cluster_and_merge(x[row : row + 1, :n], k)[0]
        got = merged[row][is_centre[row]]
        assert got.shape == (k, 6)
        key = lambda t: t[t[:, 0].argsort()]  # noqa: E731 - the same set, in any order
        torch.testing.assert_close(key(got), key(expected), atol=1e-5, rtol=0)


def test_planted_scores_have_one_right_answer_per_stage():
    adapter, _ = models()
    batch = adapter.encode(samples(), padding_side="left")
    eng = Engine(adapter)
    iv = SparseVLM(keep=0.5, layers=[1, 2], recycle=False)
    ctx = eng.context(batch)
    iv.setup(ctx)
    vis = batch.roles.visual
    gen = torch.Generator().manual_seed(0)
    hidden = torch.zeros(vis.shape[0], vis.shape[1], 8)
    from embedlens.interventions.context import Rows

    rows = Rows.pack(ctx.valid)
    for stage, layer in enumerate([1, 2]):
        planted = torch.rand(vis.shape, generator=gen)
        iv._relation[layer] = planted
        cand = vis & ctx.present(layer)
        iv.after_layer(ctx, layer, rows.gather(hidden), rows)
        for b in range(vis.shape[0]):
            pos = cand[b].nonzero().flatten()
            k = min(int(iv._counts[b, 0, stage]), len(pos) - 1)
            assert set(kept_after(ctx, layer + 1)[b].nonzero().flatten().tolist()) == set(pos[planted[b, pos].topk(k).indices].tolist())


def test_first_stage_equals_the_reference_on_a_tiny_model(monkeypatch):
    adapter, eager = models()
    batch = adapter.encode(samples(), padding_side="right")
    iv = SparseVLM(keep=0.5)  # 4 layers: drops after layers [0, 1, 2]
    seen = {}
    original = iv.after_layer

    def capture(ctx, layer, hidden, rows):
        out = original(ctx, layer, hidden, rows)
        if layer == 0:
            seen["hidden"], seen["rows"] = rows.scatter(torch.zeros(*ctx.roles.kind.shape, hidden.shape[-1]), out), rows
        return out

    monkeypatch.setattr(iv, "after_layer", capture)
    out = Engine(adapter).run(batch, [iv])
    eq = eager_outputs(batch)
    ctx = out.context
    for b in range(len(batch.samples)):
        n_valid = int((~batch.roles.padding[b]).sum())
        vis = batch.roles.visual[b].nonzero().flatten()
        start, n = int(vis[0]), len(vis)
        text_start = start + n
        count = iv.schedule(n, adapter.n_llm_layers)[0]
        monkeypatch.setattr(ref, "sparse_token_dict", {ref.RETAIN_TOKN: [count]})
        monkeypatch.setattr(ref, "layer_dict", {0: 0})
        raters = ref.select_raters(eq.hidden_states[0][b:b + 1, :n_valid], start, text_start)
        att = eq.attentions[0][b:b + 1, :, :n_valid, :n_valid]
        mask, _, relation = ref.attn_postprocess_topk(att, start, n, text_start, raters, 0)
        kept = set((vis[mask[0]]).tolist())
        # recycling: the best 30% + 1 of the dropped, by the same score, merged from layer 0's output
        dropped = (~mask[0]).nonzero().flatten()
        n_sel = int(len(dropped) * 0.3) + 1
        sel = dropped[relation[0][dropped].topk(n_sel).indices]
        torch.manual_seed(0)
        merged = ref.cluster_and_merge(eq.hidden_states[1][b:b + 1, vis[sel]], n_sel // 10 + 1)[0]
        present = kept_after(ctx, 1)[b]
        centres = present.clone()
        centres[list(kept)] = False
        assert kept <= set(present.nonzero().flatten().tolist())
        assert int(centres.sum()) == len(merged)
        got = seen["hidden"][b][centres]
        dists = torch.cdist(got, merged)
        assert dists.min(dim=1).values.max() < 1e-4 and dists.min(dim=0).values.max() < 1e-4


def test_every_stage_equals_a_hand_run_with_the_reference_functions(monkeypatch):
    """A layer-by-layer run of the eager Hugging Face layers, one sample at a time, choosing with the authors' own
    functions at every stage: raters (`select_raters`), kept tokens (`attn_postprocess_topk`, with this budget's
    stage counts) and recycled tokens (`cluster_and_merge`), each merged token put at its cluster centre's place
    and position id (the engine's convention; the centres are read from the engine's run, their merged values
    from the reference). The kept sets, the merged values and the final logits must agree."""
    from tests.reduction.inllm_support import eager_layer, eager_layer_attention

    adapter, eager = models()
    batch = adapter.encode(samples(), padding_side="left")
    iv = SparseVLM(keep=0.5, layers=[0, 1, 2])
    states = {}
    original = iv.after_layer

    def capture(ctx, layer, hidden, rows):
        out = original(ctx, layer, hidden, rows)
        states[layer] = rows.scatter(torch.zeros(*ctx.roles.kind.shape, hidden.shape[-1]), out)
        return out

    monkeypatch.setattr(iv, "after_layer", capture)
    out = Engine(adapter).run(batch, [iv])
    embeds = Engine(adapter).embed(batch)
    positions = eager.position_ids(batch.inputs)
    monkeypatch.setattr(ref, "layer_dict", {0: 0, 1: 1, 2: 2})
    for b in range(len(batch.samples)):
        valid = ~batch.roles.padding[b]
        idx = valid.nonzero().flatten()
        vis_pos = batch.roles.visual[b].nonzero().flatten()
        first = int(idx[0])
        start, n = int(vis_pos[0]) - first, len(vis_pos)
        monkeypatch.setattr(ref, "sparse_token_dict", {ref.RETAIN_TOKN: list(iv.schedule(n, 4))})
        h = embeds[b][valid][None]
        raters = ref.select_raters(h, start, start + n)
        v_num = n
        for layer in range(4):
            att = eager_layer_attention(eager, layer, h, positions[b][idx])
            h = eager_layer(eager, layer, h, positions[b][idx])
            if layer > 2:
                continue
            mask, _, relation = ref.attn_postprocess_topk(att[None], start, v_num, start + v_num, raters, layer)
            vis_now = idx[start:start + v_num]
            dropped = (~mask[0]).nonzero().flatten()
            sel = dropped[relation[0][dropped].topk(int(len(dropped) * 0.3) + 1).indices]
            torch.manual_seed(0)
            merged = ref.cluster_and_merge(h[:, start + sel], len(sel) // 10 + 1)[0]
            present = kept_after(out.context, layer + 1)[b]
            kept = set(vis_now[mask[0]].tolist())
            centres = sorted(set(present.nonzero().flatten().tolist()) - kept)
            assert kept <= set(present.nonzero().flatten().tolist()) and len(centres) == len(merged)
            got = states[layer][b][centres]
            match = torch.cdist(got, merged).argmin(dim=1)
            torch.testing.assert_close(got, merged[match], atol=1e-4, rtol=0)
            assert len(set(match.tolist())) == len(merged)
            # the next stage's sequence: kept tokens, and the merged ones at their centres, in position order
            values = dict(zip(centres, merged[match]))
            stay = ~torch.isin(idx, vis_now) | torch.isin(idx, torch.tensor(sorted(kept | set(centres))))
            h = torch.stack([values.get(int(p), h[0, i]) for i, p in enumerate(idx.tolist()) if stay[i]])[None]
            idx = idx[stay]
            v_num = len(kept) + len(centres)
        last = int(batch.roles.last_index[b])
        with torch.no_grad():
            expected = eager.model.lm_head(eager.model.model.language_model.norm(h))[0, -1]
        torch.testing.assert_close(out.logits()[b][last], expected, atol=1e-4, rtol=0)

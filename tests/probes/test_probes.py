"""Each probe against an independent computation: Hugging Face eager outputs or brute force in float64."""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from embedlens.adapters.capabilities import Capability
from embedlens.adapters.base import resolve_path
from embedlens.sites import Site
from embedlens.probes import (
    AnchorGroups,
    AttentionFlow,
    ContextualLens,
    DeadTokenEntropy,
    LayerAlignment,
    LogitLens,
    SemanticProbe,
    SinkDetector,
    TokenClusters,
    TunedLens,
)
from embedlens.probes.contextual_lens import default_corpus
from embedlens.probes.layer_alignment import linear_cka
from embedlens.testing.planted import planted_model, planted_samples
from embedlens.tracing import collect
from tests.conftest import get_adapter, mixed_samples, run_probe
from tests.support.packed import without_class_rows


@contextmanager
def eager(adapter):
    adapter.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        adapter.model.set_attn_implementation("sdpa")


def _hf(adapter, batch, **kw):
    with torch.no_grad():
        return adapter.model(**adapter.model_inputs(batch), position_ids=adapter.position_ids(batch.inputs), **kw)


def _cos64(x, y):
    return F.normalize(x.double(), dim=-1) @ F.normalize(y.double(), dim=-1).T


def test_attention_rows_equal_the_eager_pattern(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter), padding_side="left")
    probe = AttentionFlow(queries=["last", "question"])
    rows = run_probe(probe, adapter, batch)["tokens"]  # the model runs with SDPA here
    with eager(adapter):
        attn = _hf(adapter, batch, output_attentions=True).attentions  # [B, H, S, S] per layer
    vt = batch.roles.visual_tokens()
    m = len(vt["sample"])
    last = batch.roles.last_index
    for layer, a in enumerate(attn):
        ref = a[vt["sample"], :, last[vt["sample"]], vt["position"]].mean(-1)  # head-averaged
        got = torch.tensor(rows["last_token_attention"][layer * m : (layer + 1) * m])
        torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=1e-4)
    # attention mass from the question tokens to the visual tokens, per layer and head
    q = batch.roles.question
    mass = probe.result()["attention_mass"]["question"]["visual"]["per_layer_head"]
    for layer, a in enumerate(attn):
        vis_mass = (a * batch.roles.visual[:, None, None, :]).sum(-1)  # [B, H, S]
        ref = (vis_mass * q[:, None, :]).sum(dim=(0, 2)) / q.sum()
        torch.testing.assert_close(torch.tensor(mass[layer], dtype=torch.float64), ref.double(), atol=1e-5, rtol=1e-4)


def test_cls_attention_equals_clip_eager_attention():
    adapter = get_adapter("llava-clip")
    batch = adapter.encode(mixed_samples(adapter=adapter))
    rows = run_probe(AttentionFlow(layers=[0], vit_cls_layer=-2), adapter, batch)["vit_cls"]
    with eager(adapter), torch.no_grad():
        att = adapter.model.model.vision_tower(batch.inputs["pixel_values"], output_attentions=True).attentions
    layer = adapter.n_vision_layers - 2
    vt = batch.roles.visual_tokens()
    ref = att[layer][:, :, 0].mean(1)[vt["feature_row"], vt["feature_col"] + 1]
    torch.testing.assert_close(torch.tensor(rows["cls_attention"]), ref, atol=1e-6, rtol=1e-5)


def test_cls_attention_is_refused_for_siglip():
    from embedlens.errors import PlanError

    with pytest.raises(PlanError, match="no CLS token"):
        AttentionFlow(vit_cls_layer=-2).check(get_adapter("llava-siglip"))


@torch.no_grad()
def test_logit_lens_matches_hf_and_float64(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter), padding_side="left")
    probe = LogitLens(roles=["last", "answer"], k=3)
    acts = collect(adapter, batch, probe.sites(adapter))
    rows = probe.update(adapter, batch, acts)["tokens"]
    out = _hf(adapter, batch, output_hidden_states=True)
    n = adapter.n_llm_layers
    norm64 = copy.deepcopy(resolve_path(adapter.model, adapter.paths.llm_norm)).double()
    head64 = copy.deepcopy(resolve_path(adapter.model, adapter.paths.unembed)).double()
    for i, (s, p, layer, role) in enumerate(zip(rows["sample"], rows["position"], rows["layer"], rows["role"])):
        h = acts[probe.sites(adapter)[layer]][s, p]
        lp = F.log_softmax(head64(norm64(h.double())), -1)
        if layer == n:  # the last layer's read-out is the model's own output
            torch.testing.assert_close(lp.float(), F.log_softmax(out.logits[s, p], -1), atol=1e-4, rtol=1e-4)
        assert rows["id_1"][i] == int(lp.argmax())
        assert math.isclose(rows["entropy"][i], float(-(lp.exp() * lp).sum()), rel_tol=1e-4, abs_tol=1e-4)
        t = rows["target_id"][i]
        if batch.samples[s].answer:
            assert t == adapter.continuation_ids(batch.samples[s], batch.samples[s].answer)[0]
            assert rows["target_rank"][i] == int((lp > lp[t]).sum())
        else:
            assert t is None


def test_tuned_lens_starts_as_the_logit_lens_learns_and_reloads(tmp_path):
    adapter = get_adapter("llava-clip")
    batches = [adapter.encode(mixed_samples(adapter=adapter), padding_side=side) for side in ("left", "right", "left")]
    plain = LogitLens(layers=[0, 1, 2, 3], roles=["visual", "text"])
    untrained = TunedLens(roles=["visual", "text"], steps=0)
    a = run_probe(plain, adapter, batches[0])["tokens"]
    b = run_probe(untrained, adapter, batches[0])["tokens"]
    assert a["id_1"] == b["id_1"] and a["entropy"] == pytest.approx(b["entropy"], abs=1e-6)
    lens = TunedLens(roles=["visual", "text"], steps=40, lr=1e-2)
    for batch in batches:
        run_probe(lens, adapter, batch)
    kl = lens.result()["kl"]
    # prequential: the third batch was scored before being trained on; the translators only ever reduce KL here
    assert all(v["tuned_lens"] < v["logit_lens"] for v in kl.values())
    path = lens.artifacts(tmp_path)[0]
    again = TunedLens(roles=["visual", "text"], translators=str(path))
    again.check(adapter)
    after = TunedLens(roles=["visual", "text"], steps=0)
    after._init(adapter)
    after._tr.load_state_dict(lens._tr.state_dict())
    x = run_probe(again, adapter, batches[0])["tokens"]
    y = run_probe(after, adapter, batches[0])["tokens"]
    assert x["id_1"] == y["id_1"] and x["entropy"] == pytest.approx(y["entropy"])


def test_dead_token_entropy_matches_float64(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter), padding_side="left")
    probe = DeadTokenEntropy(temperature=0.1, chunk_size=37)
    acts = collect(adapter, batch, probe.sites(adapter))
    rows = probe.update(adapter, batch, acts)["tokens"]
    vt = batch.roles.visual_tokens()
    x = acts[probe.sites(adapter)[0]][vt["sample"], vt["position"]]
    vocab = adapter.input_embeddings().detach()
    sims = _cos64(x, vocab).nan_to_num(0.0)
    p = (sims / 0.1).softmax(-1)
    ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
    torch.testing.assert_close(torch.tensor(rows["entropy"]).double(), ent, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(rows["normalized_entropy"]).double(), ent / math.log(vocab.shape[0]), atol=1e-4, rtol=1e-5)
    top1 = sims.argmax(-1)
    assert rows["top1_id"] == top1.tolist()
    # image specificity: 1 - (share of images in which the token's top-1 id is some token's top-1)
    images = {}
    for s, i, t in zip(vt["sample"].tolist(), vt["image"].tolist(), top1.tolist()):
        images.setdefault((s, i), set()).add(t)
    df = {t: sum(t in ids for ids in images.values()) for t in set(top1.tolist())}
    want = sum(1 - df[t] / len(images) for t in top1.tolist()) / len(top1)
    assert probe.result()["groups"]["visual"]["image_specificity"] == pytest.approx(want)


def test_vit_norms_match_hf_hidden_states(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter))
    rows = run_probe(SinkDetector(), adapter, batch)["tokens"]
    tower = resolve_path(adapter.model, adapter.paths.vision_embed.rsplit(".", 1)[0])
    vt = batch.roles.visual_tokens()
    if adapter.has(Capability.PACKED_TOWER):  # Qwen-VL, Pixtral: every patch of the batch in one sequence; statistics per image
        with torch.no_grad():
            hs = tower(batch.inputs["pixel_values"], **adapter.tower_kwargs(batch.inputs), output_hidden_states=True).hidden_states
        # the site's view (`site_value`): Qwen-VL's tower states have no batch dimension, Gemma 4's padded image
        # rows are packed
        feats = adapter.site_value(Site("vision.layers", adapter.n_vision_layers - 2), hs[adapter.n_vision_layers - 1], batch.inputs)
        feats = without_class_rows(feats, batch.inputs)  # LLaVA-OneVision-1.5: patches only, as vision.layers
        if "image_grid_thw" in batch.inputs:
            counts = batch.inputs["image_grid_thw"].prod(-1)
        elif "image_position_ids" in batch.inputs:  # Gemma 4: each image's real patches, (-1, -1) for padding
            counts = (batch.inputs["image_position_ids"] >= 0).all(-1).sum(-1)
        elif "image_num_crops" in batch.inputs:  # Molmo2: each image's crops, every patch of each
            counts = batch.inputs["image_num_crops"] * batch.inputs["pixel_values"].shape[-2]
        else:  # Pixtral: each image's real patches, its padding cut off by image_sizes
            counts = (batch.inputs["image_sizes"] // adapter.config.vision_config.patch_size).prod(-1)
        image_of = torch.repeat_interleave(torch.arange(len(counts)), counts)  # the image of each patch
    else:
        pv = batch.inputs["pixel_values"].reshape(-1, *batch.inputs["pixel_values"].shape[-3:])
        pv = pv[(pv != 0).flatten(1).any(1)]  # the tiles the tower saw (padding tiles are blank)
        with torch.no_grad():
            hs = tower(pv, output_hidden_states=True).hidden_states
        feats = hs[adapter.n_vision_layers - 1]  # output of layer n-2 = vision.layers[-2]
        if type(tower).__name__ == "Llama4VisionModel":  # its class row comes after the patches: not a patch, left out
            feats = feats[:, :-1]
    # each token's patches (one, or the block a pixel-shuffle family merges): the block's largest norm
    patches = adapter.patch_indices(vt["feature_col"], batch.inputs) + adapter.n_prefix_tokens
    patch_norms = feats.double().norm(dim=-1)[vt["feature_row"][:, None], patches]  # [tokens, block]
    torch.testing.assert_close(torch.tensor(rows["vit_norm"]).double(), patch_norms.amax(1), atol=1e-4, rtol=1e-5)
    all_norms = feats.double().norm(dim=-1)[:, adapter.n_prefix_tokens :]  # statistics over every patch the ViT saw
    sigma_only = run_probe(SinkDetector(vit_ratio=0.0), adapter, batch)["tokens"]["vit_norm_flag"]
    assert any(sigma_only)  # the 2-sigma tail of any image: what the ratio keeps out
    for t, (flag, flag0, r, ns) in enumerate(zip(rows["vit_norm_flag"], sigma_only, vt["feature_row"].tolist(), patch_norms.tolist())):
        v = all_norms[r]
        if adapter.has(Capability.PACKED_TOWER):  # the patches of this token's own image
            v = v[image_of == image_of[patches[t, 0] - adapter.n_prefix_tokens]]
        tails = [n > float(v.mean() + 2 * v.std(unbiased=False)) for n in ns]  # a block's token: any of its patches
        assert flag0 == any(tails)
        assert flag == any(t and n >= 2 * float(v.median()) for t, n in zip(tails, ns))


def test_contextual_lens_matches_brute_force(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter), padding_side="left")
    probe = ContextualLens(layer=2, k=2)
    acts = collect(adapter, batch, probe.sites(adapter))
    rows = probe.update(adapter, batch, acts)["tokens"]
    tok = adapter.tokenizer
    bank, words = [], []
    special = set(tok.all_special_ids)
    seen = set()  # a token after a prefix already in the bank has that entry's state: the bank holds it once
    for text in default_corpus():  # one passage at a time, no padding: an independent path
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            pos = torch.arange(ids.shape[1])[None] + adapter.position_offset
            h = resolve_path(adapter.model, adapter.paths.language_model)(input_ids=ids, position_ids=pos, output_hidden_states=True).hidden_states[2][0]
        for t, i in enumerate(ids[0].tolist()):
            prefix = tuple(ids[0][: t + 1].tolist())
            if i not in special and prefix not in seen:
                seen.add(prefix)
                bank.append(h[t])
                words.append(tok.convert_ids_to_tokens(i))
    vt = batch.roles.visual_tokens()
    x = acts[probe.sites(adapter)[0]][vt["sample"], vt["position"]]
    sims = _cos64(x, torch.stack(bank))
    top_s, top_i = sims.topk(2, dim=-1)
    assert probe.result()["bank_size"] == len(bank)
    torch.testing.assert_close(torch.tensor(rows["score_1"]).double(), top_s[:, 0], atol=1e-4, rtol=1e-4)
    clear = (top_s[:, 0] - top_s[:, 1]) > 1e-4  # ties between identical words may order either way
    assert [w for w, c in zip(rows["neighbour_1"], clear.tolist()) if c] == [words[i] for i, c in zip(top_i[:, 0].tolist(), clear.tolist()) if c]


def test_layer_alignment_matches_brute_force(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter), padding_side="right")
    probe = LayerAlignment()
    acts = collect(adapter, batch, probe.sites(adapter))
    probe.check(adapter)
    probe.update(adapter, batch, acts)
    res = probe.result()
    vt = batch.roles.visual_tokens()
    sites = probe.sites(adapter)
    x0 = acts[sites[0]][vt["sample"], vt["position"]]
    text = batch.roles.text
    ts, tp = text.nonzero(as_tuple=True)
    for layer, got in zip(res["layers"], res["mean_best_cosine"]["visual"]):
        t = acts[sites[layer]][ts, tp]
        want = _cos64(x0, t.half().float()).max(dim=1).values.mean()  # text states are kept in float16
        assert got == pytest.approx(float(want), abs=1e-5)
        # CKA over the three samples, in the feature-space form ||Y'X||^2 / (||X'X|| ||Y'Y||)
        vx = torch.stack([x0[vt["sample"] == b].mean(0) for b in range(3)]).double()
        ty = torch.stack([t[ts == b].mean(0) for b in range(3)]).double()
        vx, ty = vx - vx.mean(0), ty - ty.mean(0)
        cka = (ty.T @ vx).norm() ** 2 / ((vx.T @ vx).norm() * (ty.T @ ty).norm())
        assert res["cka"]["visual"][layer] == pytest.approx(float(cka), abs=1e-6)
    assert res["recommended_layer"] == res["layers"][int(torch.tensor(res["mean_best_cosine"]["visual"]).argmax())]


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, generator=g)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    assert linear_cka(x, x @ q * 3 + 1) == pytest.approx(1.0)  # invariant to rotation, scale, shift
    assert linear_cka(x, torch.randn(20, 5, generator=g)) < 0.6


def test_token_clusters_separate_planted_directions():
    adapter, truth = planted_model("clip")
    batch = adapter.encode(planted_samples(5))
    from embedlens.groups import Partition

    probe = TokenClusters(n_clusters=7)  # dead (+ its scaled marker), sink, five colours
    acts = collect(adapter, batch, probe.sites(adapter))
    batch.groups = Partition(anchors={"sink": [truth.sink_id], "dead": [truth.dead_id]}, k=1).label(adapter, batch, acts=acts)
    probe.update(adapter, batch, acts)
    res = probe.result()
    assert res["purity"] == 1.0
    assert sorted(res["cluster_sizes"]) == [4, 4, 4, 4, 4, 5, 55]
    groups, table = probe.contingency()
    assert table.sum(0).tolist() == [int((batch.groups[g]).sum()) for g in groups]


def test_semantic_probe_equals_direct_cross_validation():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    adapter = get_adapter("llava-siglip")
    samples = planted_samples(10)
    batch = adapter.encode(samples)
    probe = SemanticProbe(attributes=["colour"], sites=["llm.embed", "llm.layers[1]"], cv=2, seed=3)
    acts = collect(adapter, batch, probe.sites(adapter))
    probe.update(adapter, batch, acts)
    vt = batch.roles.visual_tokens()
    y = [samples[s].meta["patch_labels"]["colour"][r][c] for s, r, c in zip(vt["sample"].tolist(), vt["row"].tolist(), vt["col"].tolist())]
    for name, site in zip(probe.site_names, probe.sites(adapter)):
        x = acts[site][vt["sample"], vt["position"]].double().numpy()
        folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=3)
        want = cross_val_score(LogisticRegression(max_iter=2000, random_state=3), x, y, cv=folds).mean()
        got = next(e for e in probe.result()["scores"] if e["site"] == name and e["group"] == "all")
        assert got["accuracy"] == pytest.approx(want) and got["n"] == len(y)
        assert got["chance"] == pytest.approx(y.count("background") / len(y))


def test_anchor_groups_match_brute_force_topk(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter), padding_side="left")
    vocab = adapter.input_embeddings().detach()
    probe = AnchorGroups({"sink": [5, 9], "dead": [6, 7, 8]}, k=3, chunk_size=29)
    acts = collect(adapter, batch, probe.sites(adapter))
    rows = probe.update(adapter, batch, acts)["tokens"]
    vt = batch.roles.visual_tokens()
    top = _cos64(acts[probe.sites(adapter)[0]][vt["sample"], vt["position"]], vocab).nan_to_num(0.0).topk(3, dim=-1).indices
    want = []
    for ids in top.tolist():
        want.append("sink" if {5, 9} & set(ids) else "dead" if {6, 7, 8} & set(ids) else "alive")
    assert rows["group"] == want
    assert probe.result()["counts"] == {g: want.count(g) for g in ("sink", "dead", "alive")}


def test_semantic_probe_standardize_reads_a_signal_carried_at_a_small_scale():
    """Planted: every visual token is the same vector plus 1e-3 x a one-hot of its colour. The L2-penalised probe
    on raw tokens sees nothing (majority class); with `standardize` the same signal is read perfectly."""
    adapter = get_adapter("llava-siglip")
    samples = planted_samples(10)
    batch = adapter.encode(samples)
    vt = batch.roles.visual_tokens()
    colours = sorted({c for s in samples for row in s.meta["patch_labels"]["colour"] for c in row})
    results = {}
    for standardize in (False, True):
        probe = SemanticProbe(attributes=["colour"], cv=2, standardize=standardize)
        (site,) = probe.sites(adapter)
        H = adapter.input_embeddings().shape[1]
        x = torch.full((*batch.input_ids.shape, H), 3.0)
        for s, p, r, c in zip(vt["sample"].tolist(), vt["position"].tolist(), vt["row"].tolist(), vt["col"].tolist()):
            x[s, p, colours.index(samples[s].meta["patch_labels"]["colour"][r][c])] += 1e-3
        probe.update(adapter, batch, {site: x})
        results[standardize] = next(e for e in probe.result()["scores"] if e["group"] == "all")
    raw, scaled = results[False], results[True]
    assert raw["accuracy"] == pytest.approx(raw["chance"]) and raw["chance"] < 0.8 and not raw["standardized"]
    assert scaled["accuracy"] == 1.0 and scaled["standardized"]


def test_attention_rows_cap_scores_where_the_model_does():
    """Gemma 2 caps its attention scores with ``attn_logit_softcapping`` (Gemma 3 keeps the key but not the cap, which
    the family-wide test above checks with a cap set). With the queries scaled so that scores pass the cap, the rows
    equal the eager pattern, and the uncapped rows would not."""
    from embedlens.adapters import wrap_model
    from embedlens.attention import applies_softcap
    from embedlens.data import Sample
    from tests.support.hf_testers import paligemma_builder
    from embedlens.testing.images import noise

    adapter = wrap_model(*paligemma_builder("gemma2", full_attention_only=True)(0))
    attn_cls = type(adapter.model.model.language_model.layers[0].self_attn)
    assert applies_softcap(attn_cls) and adapter.model.config.text_config.attn_logit_softcapping == 50.0
    with torch.no_grad():
        for layer in adapter.model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(1000.0)
            layer.self_attn.k_proj.weight.mul_(1000.0)
    batch = adapter.encode([Sample([noise(20, 20, seed=1)], question="what is it?", id="a"),
                            Sample([noise(20, 20, seed=2)], question="count the shapes", id="b")], padding_side="left")
    probe = AttentionFlow(queries=["last"])
    rows = run_probe(probe, adapter, batch)["tokens"]
    attn = _hf(adapter, batch, output_attentions=True).attentions  # Gemma 2 runs eager (no SDPA with a cap)
    vt = batch.roles.visual_tokens()
    m, last = len(vt["sample"]), batch.roles.last_index
    got = torch.tensor(rows["last_token_attention"][:m])
    ref = attn[0][vt["sample"], :, last[vt["sample"]], vt["position"]].mean(-1)
    torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=1e-4)
    import embedlens.attention as attention

    original = attention.applies_softcap
    try:
        attention.applies_softcap = lambda cls: False
        uncapped = torch.tensor(run_probe(AttentionFlow(queries=["last"]), adapter, batch)["tokens"]["last_token_attention"][:m])
    finally:
        attention.applies_softcap = original
    assert (uncapped - ref).abs().max() > 1e-2  # the cap bites

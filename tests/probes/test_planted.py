"""Planted structure: the partition, anchor discovery and the sink detectors recover exactly what was planted."""

from __future__ import annotations

import pytest
import torch

from embedlens.groups import Partition
from embedlens.probes import AnchorDiscovery, SemanticProbe, SinkDetector, TokenPartition
from embedlens.sites import Site
from embedlens.testing.planted import planted_model, planted_samples
from embedlens.tracing import collect
from tests.conftest import run_probe

_MODELS: dict = {}


@pytest.fixture(params=["clip", "siglip"])
def planted(request):
    if request.param not in _MODELS:
        _MODELS[request.param] = planted_model(request.param)
    adapter, truth = _MODELS[request.param]
    batch = adapter.encode(planted_samples(5), padding_side="left")
    return adapter, truth, batch


def _mask_of(rows, batch, column, value=True):
    """`[batch, seq]` mask of the rows of a per-token table whose `column` equals `value`."""
    m = torch.zeros_like(batch.roles.visual)
    for s, p, v in zip(rows["sample"], rows["position"], rows[column]):
        if v == value:
            m[s, p] = True
    return m


def test_token_partition_recovers_planted_anchor_groups(planted):
    adapter, truth, batch = planted
    rows = run_probe(TokenPartition(anchors={"sink": [truth.sink_id], "dead": [truth.dead_id]}, k=1), adapter, batch)["tokens"]
    for g, want in truth.masks(batch).items():
        assert torch.equal(_mask_of(rows, batch, "group", g), want), g


def test_rules_combine_with_precedence_and_overlaps(planted):
    adapter, truth, batch = planted
    probe = TokenPartition(anchors={"sink": [truth.sink_id], "dead": [truth.dead_id]}, k=1, vit_norm="sink", massive="sink")
    rows = run_probe(probe, adapter, batch)["tokens"]
    p = truth.patch_masks(batch)
    assert torch.equal(_mask_of(rows, batch, "group", "sink"), p["vit"] | p["massive"])
    assert torch.equal(_mask_of(rows, batch, "group", "dead"), p["background"] & ~p["vit"] & ~p["massive"])
    assert torch.equal(_mask_of(rows, batch, "vit_norm"), p["vit"])
    assert torch.equal(_mask_of(rows, batch, "massive"), p["massive"])
    # the massive-activation patch sits on the dead row: claimed by both, sink wins by precedence
    assert probe.result()["overlaps"] == {"sink&dead": 5}
    reordered = TokenPartition(anchors={"sink": [truth.sink_id], "dead": [truth.dead_id]}, k=1, massive="sink", order=["dead", "sink"])
    rows = run_probe(reordered, adapter, batch)["tokens"]
    assert torch.equal(_mask_of(rows, batch, "group", "dead"), p["background"] & ~p["vit"])


def test_anchor_discovery_finds_exactly_the_planted_anchors(planted):
    adapter, truth, batch = planted
    probe = AnchorDiscovery()
    run_probe(probe, adapter, batch)
    cands = {c["id"]: c["verdict"] for c in probe.candidates() if c["verdict"] in ("sink", "dead")}
    assert cands == {truth.dead_id: "dead", truth.sink_id: "sink"}
    # and the partition built on discovered anchors alone matches the ground truth
    part = Partition(discover=True, k=1)
    part.fit(adapter, [batch])
    assert part.discovered == {"sink": [truth.sink_id], "dead": [truth.dead_id]}
    masks = part.label(adapter, batch)
    for g, want in truth.masks(batch).items():
        assert torch.equal(masks[g], want), g


def test_sink_detector_flags_exactly_the_planted_tokens(planted):
    adapter, truth, batch = planted
    probe = SinkDetector()  # tau scaled to d: a 64-wide model cannot reach 20 (max |h/rms(h)| is sqrt(64))
    rows = run_probe(probe, adapter, batch)["tokens"]
    p = truth.patch_masks(batch)
    assert torch.equal(_mask_of(rows, batch, "vit_norm_flag"), p["vit"])
    assert torch.equal(_mask_of(rows, batch, "massive_flag"), p["massive"])
    assert torch.equal(_mask_of(rows, batch, "attention_sink_flag"), p["massive"])
    res = probe.result()
    assert res["sink_dims"] == [truth.massive_dim]
    first = res["layers"][str(truth.massive_layer)]
    assert first["top_dims"][0][0] == truth.massive_dim
    assert first["roles"] == {"visual": 5, "bos": 5}  # BOS carries the planted activation too
    assert res["layers"][str(truth.massive_layer - 1)]["n_massive"] == 0  # not before the planted layer
    assert res["agreement"]["massive&attention_sink"]["jaccard"] == 1.0
    assert res["agreement"]["vit_norm&massive"]["both"] == 0


def test_attention_sink_dims_are_shared_not_any_tokens_outlier(planted):
    """Kang et al.'s sink dims are shared by sink tokens: one visual token with a value past tau in a dim no other
    image uses is not flagged, and the dims stay the planted one; the same outlier in two images is a shared dim."""
    adapter, truth, batch = planted
    probe = SinkDetector()
    acts = collect(adapter, batch, probe.sites(adapter))
    layer = truth.massive_layer + 1
    h = acts[Site("llm.layers", layer)].clone()
    d = h.shape[-1]
    dim = (truth.massive_dim + 5) % d
    p = truth.patch_masks(batch)
    plain = (batch.roles.visual & ~p["massive"]).nonzero()  # visual tokens that are no sink, by sample
    one = plain[plain[:, 0] == 0][3]
    two = plain[plain[:, 0] == 1][3]
    h[one[0], one[1], dim] = 3 * h[one[0], one[1]].norm()  # RMS-normalised about 0.95 sqrt(d): far past tau
    rows = probe.update(adapter, batch, {**acts, Site("llm.layers", layer): h})["tokens"]
    assert torch.equal(_mask_of(rows, batch, "attention_sink_flag"), p["massive"])  # not the outlier
    assert probe.result()["sink_dims"] == [truth.massive_dim]
    h[two[0], two[1], dim] = 3 * h[two[0], two[1]].norm()  # the same dim in a second image: shared, a sink dim
    shared = SinkDetector()
    rows = shared.update(adapter, batch, {**acts, Site("llm.layers", layer): h})["tokens"]
    want = p["massive"].clone()
    want[one[0], one[1]] = want[two[0], two[1]] = True
    assert torch.equal(_mask_of(rows, batch, "attention_sink_flag"), want)
    assert shared.result()["sink_dims"] == sorted([truth.massive_dim, dim])


def test_semantic_probe_reads_colour_from_object_tokens_only(planted):
    adapter, truth, batch = planted
    part = Partition(anchors={"sink": [truth.sink_id], "dead": [truth.dead_id]}, k=1)
    probe = SemanticProbe(attributes=["colour"], sites=["llm.embed"], cv=2)
    for seed in range(2):  # two batches, ten images, two per colour
        b = adapter.encode(planted_samples(10)[seed * 5 : seed * 5 + 5], padding_side="right")
        acts = collect(adapter, b, probe.sites(adapter))
        b.groups = part.label(adapter, b, acts=acts)
        probe.update(adapter, b, acts)
    scores = {(e["group"]): e for e in probe.result()["scores"]}
    assert scores["alive"]["accuracy"] == 1.0 and scores["alive"]["n"] == 40
    assert scores["dead"]["accuracy"] is None and scores["dead"]["chance"] == 1.0  # one class: nothing to learn


def test_attention_sink_test_fires_at_its_default_on_a_sink_of_realistic_strength(planted):
    """The planted massive activation weakened to a realistic share of the ceiling sqrt(d) (0.6 of it; LLaMA-2-7B's
    sinks pass Kang et al.'s tau = 20 = 0.31 sqrt(4096)): the default tau, scaled to the model's d, flags exactly
    the planted token; Kang's 20 cannot fire at d = 64 and the result says so instead of reporting disagreement."""
    import math

    from embedlens.probes.sink_detector import default_tau

    adapter, truth, batch = planted
    d = adapter.input_embeddings().shape[1]
    saved = truth.massive_value
    try:
        truth.massive_value = 0.0
        h = collect(adapter, batch, [f"llm.layers[{truth.massive_layer}]"])[Site("llm.layers", truth.massive_layer)].float()
        rest = h.norm(dim=-1).max()  # the largest residual norm without the plant
        truth.massive_value = float(0.75 * rest)  # v / sqrt(v^2 + rest^2) = 0.6: the sink's RMS-normalised value is 0.6 sqrt(d)
        probe = SinkDetector()
        rows = run_probe(probe, adapter, batch)["tokens"]
        p = truth.patch_masks(batch)
        assert torch.equal(_mask_of(rows, batch, "attention_sink_flag"), p["massive"])
        scores = torch.tensor(rows["attention_sink_score"])[torch.tensor(rows["attention_sink_flag"])]
        assert (scores / math.sqrt(d)).min() >= 0.55 and (scores / math.sqrt(d)).max() <= 0.75  # about the strength planted
        res = probe.result()
        assert res["attention_sink"] == {"tau": default_tau(d), "ceiling": math.sqrt(d), "status": "can fire"}
        assert res["sink_dims"] == [truth.massive_dim] and not res["warnings"]
        kang = SinkDetector(tau=20.0)
        rows = run_probe(kang, adapter, batch)["tokens"]
        assert not any(rows["attention_sink_flag"])
        res = kang.result()
        assert res["attention_sink"]["status"].startswith("cannot fire") and res["warnings"]
        assert res["agreement"]["massive&attention_sink"]["jaccard"] is None  # not 0.0: no verdict, not disagreement
        assert "cannot fire" in res["agreement"]["massive&attention_sink"]["note"]
        assert res["agreement"]["vit_norm&massive"]["jaccard"] is not None
    finally:
        truth.massive_value = saved

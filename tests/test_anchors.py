"""Anchor discovery (`embedlens.anchors`): the statistics against brute force, and planted truths where frequency fails."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from embedlens.anchors import AnchorEvidence, AnchorRule
from embedlens.groups import Partition
from embedlens.probes import AnchorDiscovery
from embedlens.testing.planted import planted_model, planted_samples
from embedlens.tracing import collect
from tests.conftest import run_probe


def test_evidence_statistics_match_brute_force_pairs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 4, (40,), generator=g)
    image = torch.randint(0, 7, (40,), generator=g)
    outlier = torch.rand(40, generator=g) < 0.3
    ev = AnchorEvidence()
    ev.add(x[:25], ids[:25], image[:25], outlier[:25])  # two batches: images are keyed per call
    ev.add(x[25:], ids[25:], image[25:] + 100, outlier[25:])
    key = torch.cat([image[:25], image[25:] + 100])
    u = torch.nn.functional.normalize(x, dim=-1)
    stats = {s["id"]: s for s in ev.stats()}
    for i in ids.unique().tolist():
        sel = (ids == i).nonzero().flatten().tolist()
        between = [float(u[a] @ u[b]) for a, b in itertools.permutations(sel, 2) if key[a] != key[b]]
        within = [float(u[a] @ u[b]) for a, b in itertools.permutations(sel, 2) if key[a] == key[b]]
        s = stats[i]
        assert s["tokens"] == len(sel) and s["images"] == len(set(key[sel].tolist()))
        assert s["cos_between"] == pytest.approx(sum(between) / len(between), abs=1e-5)
        if within:
            assert s["cos_within"] == pytest.approx(sum(within) / len(within), abs=1e-5)
        else:
            assert math.isnan(s["cos_within"])
        assert s["outlier_fraction"] == pytest.approx(float(outlier[sel].float().mean()))
        assert s["norm_ratio"] == pytest.approx(float(x[sel].norm(dim=-1).mean() / x.norm(dim=-1).mean()), rel=1e-6)


def test_a_word_repeated_inside_one_image_is_not_collapse():
    """Identical tokens in one image (a big uniform region) say nothing about other images: 'rare', never dead."""
    row = torch.tensor([1.0, 0.0, 0.0])
    x = torch.cat([row.repeat(5, 1), torch.randn(20, 3, generator=torch.Generator().manual_seed(1))])
    ids = torch.tensor([9] * 5 + [1, 2, 3, 4] * 5)
    image = torch.tensor([0] * 5 + list(range(20)))
    ev = AnchorEvidence()
    ev.add(x, ids, image, torch.zeros(25, dtype=torch.bool))
    assert math.isnan(next(s for s in ev.stats() if s["id"] == 9)["cos_between"])  # no pair across images
    assert 9 not in {r["id"] for r in ev.table(AnchorRule())}  # the table lists ids seen in two images or more
    assert ev.anchors(AnchorRule()) == {"sink": [], "dead": []}


_MODELS: dict = {}


def _planted(name, **kw):
    if name not in _MODELS:
        _MODELS[name] = planted_model("clip", **kw)
    return _MODELS[name]


SCENARIOS = {
    # (a) a content word is some token's nearest row in every image
    "content_word_everywhere": (dict(content_word="square"), dict()),
    # (b) the dead anchor is absent from every third image (filled by the square)
    "anchor_absent_sometimes": (dict(), dict(full_every=3)),
    # (c) no dead tokens at all
    "no_dead_tokens": (dict(background="content"), dict()),
    # (d) two dead anchors and a sink anchor
    "two_dead_one_sink": (dict(dead_words=("empty", "dead")), dict()),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_discovery_returns_exactly_the_planted_anchors(scenario):
    model_kw, data_kw = SCENARIOS[scenario]
    adapter, truth = _planted(scenario, **model_kw)
    samples = planted_samples(10, **data_kw)
    batches = [adapter.encode(samples[i : i + 5], padding_side="left") for i in (0, 5)]
    part = Partition(discover=True, k=1)
    part.fit(adapter, batches)
    assert {g: sorted(v) for g, v in part.discovered.items()} == {g: sorted(v) for g, v in truth.anchors().items()}
    for b in batches:  # and the groups are the planted ones, token for token
        masks = part.label(adapter, b)
        for g, want in truth.masks(b).items():
            assert torch.equal(masks[g], want), (scenario, g)
    # the probe is the same discovery: same verdicts
    probe = AnchorDiscovery(massive=False)
    for b in batches:
        run_probe(probe, adapter, b)
    assert probe.anchors() == part.discovered
    evidence = {r["id"]: r for r in part.evidence}
    if truth.content_id is not None:  # present in every image, and still content
        assert evidence[truth.content_id]["image_fraction"] == 1.0
        assert evidence[truth.content_id]["verdict"] == "content"
    if scenario == "anchor_absent_sometimes":
        assert evidence[truth.dead_id]["images"] == 6  # 4 of 10 images have no background


def test_frequency_alone_would_call_the_everywhere_word_an_anchor():
    """The calibration case: by image frequency the content word ranks with the dead anchor."""
    adapter, truth = _planted("content_word_everywhere", content_word="square")
    batch = adapter.encode(planted_samples(10), padding_side="left")
    part = Partition(discover=True, k=1)
    part.fit(adapter, [batch])
    ev = {r["id"]: r for r in part.evidence}
    assert ev[truth.content_id]["image_fraction"] == ev[truth.dead_id]["image_fraction"] == 1.0
    assert ev[truth.content_id]["relative_dispersion"] > 3 * part.discover_max_dispersion
    assert ev[truth.dead_id]["relative_dispersion"] < part.discover_max_dispersion / 5


def test_evidence_is_decoded_and_explains_every_verdict():
    adapter, truth = _planted("two_dead_one_sink", dead_words=("empty", "dead"))
    part = Partition(discover=True, k=1)
    part.fit(adapter, [adapter.encode(planted_samples(10), padding_side="left")])
    tok = adapter.tokenizer
    for r in part.evidence:
        assert r["token"] == tok.convert_ids_to_tokens(r["id"])
        assert r["verdict"] in ("sink", "dead", "content", "rare", "excess") and r["reason"]
    assert {a["token"] for a in part.anchor_table() if a["group"] == "dead"} == {"empty", "dead"}
    assert [a["token"] for a in part.anchor_table() if a["group"] == "sink"] == ["corner"]

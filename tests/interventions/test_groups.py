"""The anchor partition recovers planted tokens, with precedence and overlaps."""

from __future__ import annotations

import torch

from embedlens.groups import Partition
from embedlens.interventions import Engine
from embedlens.interventions.prune import Prune
from embedlens.testing import tiny_batch


def test_planted_anchors_are_recovered_and_prunable():
    adapter, batch = tiny_batch("llava-siglip", n=2, padding_side="left")
    eng = Engine(adapter)
    embeds = eng.embed(batch).clone()
    vocab = adapter.input_embeddings().detach()
    sink_id, dead_id = 11, 12
    vis = batch.roles.visual.nonzero()
    planted = {"sink": vis[[0, 20]], "dead": vis[[1, 2, 21]], "both": vis[[3]]}
    for b, p in planted["sink"].tolist():
        embeds[b, p] = 5 * vocab[sink_id]
    for b, p in planted["dead"].tolist():
        embeds[b, p] = 5 * vocab[dead_id]
    for b, p in planted["both"].tolist():  # near both anchors: sink wins by precedence
        embeds[b, p] = vocab[sink_id] / vocab[sink_id].norm() + vocab[dead_id] / vocab[dead_id].norm()
    part = Partition({"sink": [sink_id], "dead": [dead_id]}, k=2)
    masks = part.label(adapter, batch, embeds=embeds)
    want_sink = torch.zeros_like(batch.roles.visual)
    want_dead = torch.zeros_like(batch.roles.visual)
    for b, p in planted["sink"].tolist() + planted["both"].tolist():
        want_sink[b, p] = True
    for b, p in planted["dead"].tolist():
        want_dead[b, p] = True
    # other tokens are random projector outputs; none lands near the planted anchors here
    assert torch.equal(masks["sink"], want_sink)
    assert torch.equal(masks["dead"], want_dead)
    assert torch.equal(masks["alive"], batch.roles.visual & ~want_sink & ~want_dead)
    assert part.last_overlap == {"sink&dead": 1}
    out = eng.run(batch, [Prune(tokens="dead")], groups=part, embeds=embeds)
    assert out.counts["visual"][0].tolist() == [16 - 2, 16 - 1]

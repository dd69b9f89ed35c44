"""The anchor partition recovers planted tokens, with precedence and overlaps."""

from __future__ import annotations

import pytest
import torch

from embedlens.errors import PlanError
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


@pytest.mark.parametrize("params, key, detail", [
    ({"anchors": {"dead": [1]}, "k": 0}, "k", "must be >= 1; got 0"),
    ({"anchors": {"dead": [1]}, "matrix": "middle"}, "matrix", "must be 'input' or 'output'; got 'middle'"),
    ({"discover": True, "discover_min_images": 2.0}, "discover_min_images", "must be a number in (0, 1]; got 2.0"),
    ({"discover": True, "discover_max_anchors": 0}, "discover_max_anchors", "must be an integer >= 1; got 0"),
    ({}, "", "no rule selected; give anchors, discover: true, or one of vit_norm / massive / entropy"),
])
def test_partition_errors_are_keyed_where_raised(params, key, detail):
    from embedlens.errors import InterventionError, ParameterError
    from embedlens.probes.partition import TokenPartition

    with pytest.raises(ParameterError) as e:
        Partition(**params)
    assert (e.value.owner, e.value.key, e.value.detail) == ("partition", key, detail)
    assert isinstance(e.value, InterventionError)  # what it was raised as before it carried its key
    assert str(e.value) == (f"partition.{key}: {detail}" if key else f"partition: {detail}")
    if key:  # the probe's copy of the parameters: its own name, the same key (the probe has default anchors)
        with pytest.raises(PlanError) as p:
            TokenPartition(**params)
        assert str(p.value) == f"token_partition.{key}: {detail}"


def test_partition_state_is_apart_from_its_parameters():
    part = Partition({"sink": [5], "dead": [6, 7]}, k=3, vit_norm="sink")
    adapter, batch = tiny_batch("llava-clip", n=2)
    part.label(adapter, batch)
    assert part.tally and part.tally is part.streaming.tally and part.last_rules is part.streaming.last_rules
    fresh = Partition({"sink": [5], "dead": [6, 7]}, k=3, vit_norm="sink")
    assert fresh == part  # equality is the parameters': the state is not configuration
    fresh.load_state_dict(part.state_dict())  # the checkpoint's flat keys, as before the split
    assert fresh.tally == part.tally and fresh.streaming.tally == part.streaming.tally and fresh.last_overlap == part.last_overlap
    import dataclasses

    from embedlens.groups import PartitionState

    assert set(PartitionState.fitted_params) == {f.name for f in dataclasses.fields(PartitionState)}  # none compared to the plan

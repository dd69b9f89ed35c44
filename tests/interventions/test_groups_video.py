"""The partition per frame of a video: one frame's tokens planted dead are exactly the dead group, frame by
frame, and pruning them equals pruning that frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens import load_model
from embedlens.data import Sample
from embedlens.groups import Partition
from embedlens.interventions import Engine
from embedlens.interventions.prune import Prune


def test_a_frame_planted_dead_is_found_frame_by_frame():
    adapter = load_model("tiny:qwen2_vl")
    rng = np.random.default_rng(0)
    frames = lambda n: [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(n)]  # noqa: E731
    batch = adapter.encode([Sample(video=frames(6), question="count the shapes", id="a"),
                            Sample(video=frames(6), question="what?", id="b")], padding_side="left")
    roles = batch.roles
    engine = Engine(adapter)
    embeds = engine.embed(batch).clone()
    dead_id = 12
    vocab = adapter.input_embeddings().detach()
    planted = roles.visual & (roles.frame == torch.tensor([[1], [2]]))  # sample a: temporal patch 1, b: patch 2
    embeds[planted] = 5 * vocab[dead_id]
    part = Partition({"dead": [dead_id]}, k=2)
    masks = part.label(adapter, batch, embeds=embeds)
    assert torch.equal(masks["dead"], planted)
    per_tp = 16  # 4 x 4 tokens per temporal patch (32-px frames, 4-px patches merged 2 x 2)
    assert roles.per_frame(masks["dead"]).tolist() == [[0, per_tp, 0], [0, 0, per_tp]]
    assert roles.per_frame(masks["alive"]).tolist() == [[per_tp, 0, per_tp], [per_tp, per_tp, 0]]
    # pruning the dead group removes those frames' tokens: 3 temporal patches of 16 -> 2 left per sample
    out = engine.run(batch, [Prune(tokens="dead")], groups=part, embeds=embeds)
    assert out.counts["visual"][0].tolist() == [2 * per_tp, 2 * per_tp]


def test_the_matched_random_control_can_respect_frames():
    from embedlens.errors import InterventionError
    from embedlens.interventions.prune import PruneRandomMatched, draw_matched
    from embedlens.interventions.select import Selection

    adapter = load_model("tiny:qwen2_vl")
    rng = np.random.default_rng(1)
    frames = lambda n: [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(n)]  # noqa: E731
    batch = adapter.encode([Sample(video=frames(6), question="what?", id=f"s{i}") for i in range(3)], padding_side="left")
    ctx = Engine(adapter).context(batch)
    roles = batch.roles
    target = "visual and ((frame == 1 and row == 0) or (frame == 2 and col < 2))"  # 4 tokens in patch 1, 8 in patch 2
    want = roles.per_frame(Selection.parse(target).evaluate(roles))
    assert want.tolist() == [[0, 4, 8]] * 3
    drawn = {}
    for per_frame in (True, False):
        for seed in range(4):
            chosen = draw_matched(ctx, Selection.parse(target), target, Selection.parse("visual"), "visual", seed, "error",
                                  True, per_frame)
            assert not (chosen & Selection.parse(target).evaluate(roles)).any() and (chosen <= roles.visual).all()
            assert chosen.sum(1).tolist() == [12, 12, 12]
            drawn[per_frame, seed] = roles.per_frame(chosen, 3)
    assert all(torch.equal(drawn[True, s], want) for s in range(4))  # frame by frame: the target's own counts
    assert any(not torch.equal(drawn[False, s], want) for s in range(4))  # without: the frames are left to chance
    # a whole temporal patch has no pool left in its frame: the error names the frame
    with pytest.raises(InterventionError, match=r"sample 's0' has 16 target tokens in frame 1 but only 0 pool tokens"):
        PruneRandomMatched(target="visual and frame == 1", per_frame=True).setup(ctx)

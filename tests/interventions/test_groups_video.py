"""The partition per frame of a video: one frame's tokens planted dead are exactly the dead group, frame by
frame, and pruning them equals pruning that frame."""

from __future__ import annotations

import numpy as np
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

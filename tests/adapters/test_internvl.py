"""InternVL: tiles + thumbnail against the image processor's own tiling.

The family-wide proofs (sites == HF hidden states, role map, one pixel patch ->
one patch -> one token of the pixel shuffle, planted codes, conformance,
intervention equivalences) run on ``tiny:internvl`` through the parametrised
suites; the same proofs run on a model built from the values of
``InternVLVisionText2TextModelTester`` in ``tests/adapters/test_hf_configs.py``
(``BLOCK_TESTER_CONFIGS``).
"""

from __future__ import annotations

import torch

from embedlens.adapters import load_model
from embedlens.data import Sample
from embedlens.roles import Role
from embedlens.testing.images import noise


def test_tiles_follow_the_image_processors_tiling():
    """Crops in row-major order as tiles 1.., the thumbnail last as tile 0 (a single crop is the whole image, tile 0);
    <img> and </img> around each image are special; feature rows count tiles over the batch."""
    adapter = load_model("tiny:internvl")
    sizes = [(20, 70), (70, 20), (32, 32), (64, 64)]  # (height, width)
    images = [noise(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    batch = adapter.encode([Sample([im], question="what is it?", id=f"s{i}") for i, im in enumerate(images)], padding_side="left")
    roles, ids = batch.roles, batch.input_ids
    ip = adapter.processor.image_processor
    gh, gw = adapter.grid()
    first_row, seen = 0, set()
    for b, im in enumerate(images):
        ref = ip(images=[im], crop_to_patches=True, return_tensors="pt")  # the image processor alone
        n = int(ref["num_patches"][0])
        seen.add(n)
        assert adapter.n_tiles(batch.inputs)[b] == n
        tiles = list(range(1, n)) + [0] if n > 1 else [0]
        span = roles.image_span[b]
        assert torch.equal(roles.tile[b][span], torch.tensor(tiles).repeat_interleave(gh * gw))
        cell = torch.arange(gh * gw).repeat(n)
        assert torch.equal(roles.row[b][span], cell // gw) and torch.equal(roles.col[b][span], cell % gw)
        assert torch.equal(roles.feature_row[b][span], first_row + torch.arange(n).repeat_interleave(gh * gw))
        # the thumbnail is the whole image: its pixels are the processor's thumbnail
        assert torch.equal(batch.inputs["pixel_values"][first_row + n - 1], ref["pixel_values"][n - 1])
        first_row += n
        p = adapter.processor
        for tid in (p.start_image_token_id, p.end_image_token_id):
            at = ids[b] == tid
            assert at.sum() == 1 and roles.kind[b][at].item() == Role.SPECIAL
    assert seen == {1, 4, 5}  # one tile; 1 x 3 / 3 x 1 crops + thumbnail; 2 x 2 crops + thumbnail

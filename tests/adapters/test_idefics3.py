"""Idefics3 and SmolVLM: sub-image layout against the processor's own split.

The family-wide proofs (sites == HF hidden states, role map, one pixel patch ->
one patch -> one token of the pixel shuffle, planted codes, conformance,
intervention equivalences) run on ``tiny:idefics3`` and ``tiny:smolvlm``
through the parametrised suites; the same proofs run on models built from the
values of ``Idefics3VisionText2TextModelTester`` and
``SmolVLMVisionText2TextModelTester`` in ``tests/adapters/test_hf_configs.py``
(``BLOCK_TESTER_CONFIGS``).
"""

from __future__ import annotations

import pytest
import torch

from embedlens.adapters import load_model
from embedlens.adapters.idefics3 import FAKE_TOKEN, GLOBAL_TAG, row_col_tag
from embedlens.data import Sample
from embedlens.roles import Role
from embedlens.testing.images import noise

@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_layout_follows_the_processors_split(name):
    """Tiles in the processor's order (row-major sub-images, then the global image as tile 0), each a full
    token grid; the markers around them are special tokens; feature rows count sub-images over the batch."""
    adapter = load_model(f"tiny:{name}")
    ip = adapter.processor.image_processor
    sizes = [(20, 70), (70, 20), (20, 20), (64, 64)]  # (height, width): 1 x 2 and 2 x 1 sub-images, then 2 x 2
    samples = [Sample([noise(h, w, seed=i)], question="what is it?", id=f"s{i}") for i, (h, w) in enumerate(sizes)]
    splits = set()
    for splitting in (True, False):  # without splitting every image is one global image
        ip.do_image_splitting = splitting
        try:
            batch = adapter.encode(samples, padding_side="left")
            splits |= set(_check_layout(adapter, batch, sizes))
        finally:
            ip.do_image_splitting = True
    assert splits == {(1, 2), (2, 1), (2, 2), (0, 0)}


def _check_layout(adapter, batch, sizes):
    roles, ids, tok = batch.roles, batch.input_ids, adapter.tokenizer
    gh, gw = adapter.grid()
    ip = adapter.processor.image_processor
    first_row = 0
    for b, (h, w) in enumerate(sizes):
        ref = ip(images=[noise(h, w, seed=b)], return_row_col_info=True)  # the image processor alone
        rows, cols = int(ref["rows"][0][0]), int(ref["cols"][0][0])
        assert adapter.image_splits(batch.inputs)[b] == (rows, cols)
        tiles = [1 + i * cols + j for i in range(rows) for j in range(cols)] + [0]
        span = roles.image_span[b]
        want_tile = torch.tensor(tiles).repeat_interleave(gh * gw)
        assert torch.equal(roles.tile[b][span], want_tile)
        cell = torch.arange(gh * gw).repeat(len(tiles))
        assert torch.equal(roles.row[b][span], cell // gw) and torch.equal(roles.col[b][span], cell % gw)
        assert torch.equal(roles.feature_row[b][span], first_row + torch.arange(len(tiles)).repeat_interleave(gh * gw))
        first_row += len(tiles)
        # every marker the processor wrote is SPECIAL; every <image> token is VISUAL
        markers = [FAKE_TOKEN, GLOBAL_TAG] + [row_col_tag(i, j) for i in range(rows) for j in range(cols)]
        marker_ids = torch.tensor(tok.convert_tokens_to_ids(markers))
        at = torch.isin(ids[b], marker_ids)
        assert at.sum() == 3 + 2 * rows * cols and (roles.kind[b][at] == Role.SPECIAL).all()
        assert (roles.kind[b][ids[b] == adapter.image_token_id] == Role.VISUAL).all()
    return adapter.image_splits(batch.inputs)

"""Idefics3 and SmolVLM: sub-image layout against the processor's own split, and the family's proofs on
HF's own tester configuration.

The family-wide proofs (sites == HF hidden states, role map, one pixel patch ->
one patch -> one token of the pixel shuffle, planted codes, conformance,
intervention equivalences) run on ``tiny:idefics3`` and ``tiny:smolvlm``
through the parametrised suites; here the same proofs also run on models built
from the values of ``Idefics3VisionText2TextModelTester`` and
``SmolVLMVisionText2TextModelTester`` (tests/models/{idefics3,smolvlm}/ in
transformers; both testers use the same values).
"""

from __future__ import annotations

import pytest
import torch

from embedlens.adapters import Idefics3Adapter, SmolVLMAdapter, load_model, wrap_model
from embedlens.adapters.idefics3 import FAKE_TOKEN, GLOBAL_TAG, row_col_tag
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.roles import Role
from embedlens.testing import BLOCK_TESTER_CONFIGS
from embedlens.testing.images import noise
from tests import test_roles
from tests.adapters import test_sites

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


def build_tester_adapter(smolvlm: bool):
    """The HF tester's model (`embedlens.testing.BLOCK_TESTER_CONFIGS`)."""
    adapter = wrap_model(*BLOCK_TESTER_CONFIGS["smolvlm" if smolvlm else "idefics3"].build(0))
    assert type(adapter) is (SmolVLMAdapter if smolvlm else Idefics3Adapter)
    return adapter


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def tester(request):
    return build_tester_adapter(smolvlm=request.param == "smolvlm")


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hf_tester_config_role_map(tester, padding_side):
    assert tester.grid() == (2, 2) and tester.patch_block == (2, 2)
    test_roles.test_visual_positions_hold_image_tokens(tester, padding_side)
    test_roles.test_text_spans_decode_to_what_was_asked(tester, padding_side)
    test_roles.test_role_kinds_partition_every_position(tester)


def test_hf_tester_config_patch_blocks_and_features(tester):
    test_roles.test_row_col_match_the_patch_embedding(tester)
    test_roles.test_sequence_positions_receive_the_named_features(tester)
    test_roles.test_newline_tokens_only_where_the_family_has_them(tester)


def test_hf_tester_config_sites(tester):
    test_sites.test_llm_sites_equal_hf_hidden_states(tester, "right")
    test_sites.test_vision_sites_equal_hf_hidden_states(tester)


def test_hf_tester_config_prune_equivalence(tester):
    from tests.interventions import test_equivalences

    batch = tester.encode(test_equivalences.prompt_samples(), padding_side="left")
    test_equivalences.test_prune_remove_mask_and_hand_cut_agree((tester, batch, Engine(tester)))

"""LLaVA-NeXT: the anyres layout against a hand computation, and the family's proofs on HF's own tester configuration.

The family-wide proofs (sites == HF hidden states, role map, patch perturbation,
planted codes, conformance, intervention equivalences) run on ``tiny:llava_next``
through the parametrised suites; here the same role-map proofs also run on a model
built from the values of ``LlavaNextVisionText2TextModelTester``
(tests/models/llava_next/test_modeling_llava_next.py in transformers).
"""

from __future__ import annotations

import pytest
import torch
from transformers.image_processing_utils import select_best_resolution

from embedlens.adapters import LlavaNextAdapter, load_model, wrap_model
from embedlens.data import Sample
from tests.support.hf_testers import TESTER_CONFIGS
from embedlens.testing.images import noise
from tests import test_roles
from tests.adapters import test_sites


def expected_layout(image_hw: tuple[int, int], tile: int, grid: int, pinpoints) -> list[tuple[int, int, int]]:
    """(tile, row, col) of each token, newline = (-1, -1, -1), from the LLaVA-NeXT paper's recipe:
    base image first; then the tile grid of the best pinpoint, its padding rows or columns cut
    symmetrically (the processor's token-count rule), each remaining row ended by a newline."""
    h, w = image_hw
    best_h, best_w = select_best_resolution((h, w), pinpoints)
    n_tr, n_tc = best_h // tile, best_w // tile
    full_h, full_w = n_tr * grid, n_tc * grid
    if w / h > full_w / full_h:  # wider than the grid: rows of padding above and below
        keep = int(round(h * (full_w / w), 7))
        top, left, rows, cols = (full_h - keep) // 2, 0, full_h - 2 * ((full_h - keep) // 2), full_w
    else:
        keep = int(round(w * (full_h / h), 7))
        top, left, rows, cols = 0, (full_w - keep) // 2, full_h, full_w - 2 * ((full_w - keep) // 2)
    out = [(0, r, c) for r in range(grid) for c in range(grid)]
    for y in range(top, top + rows):
        for x in range(left, left + cols):
            out.append((1 + (y // grid) * n_tc + x // grid, y % grid, x % grid))
        out.append((-1, -1, -1))
    return out


def test_layout_equals_the_hand_computed_unpadding():
    adapter = load_model("tiny:llava_next")
    cfg = adapter.config
    sizes = [(40, 70), (70, 40), (64, 64), (32, 32), (20, 60)]  # (height, width): wide, tall, square, small
    samples = [Sample([noise(h, w, seed=i)], question="what is it?", id=f"s{i}") for i, (h, w) in enumerate(sizes)]
    batch = adapter.encode(samples, padding_side="left")
    roles = batch.roles
    for b, (h, w) in enumerate(sizes):
        span = roles.image_span[b]
        got = list(zip(roles.tile[b][span].tolist(), roles.row[b][span].tolist(), roles.col[b][span].tolist()))
        want = expected_layout((h, w), cfg.vision_config.image_size, adapter.grid()[0], cfg.image_grid_pinpoints)
        assert got == want, (h, w)
        assert int(roles.image_newline[b].sum()) == sum(t == -1 for t, _, _ in want)
    # newline tokens carry the model's learned image_newline vector
    emb = adapter.model.model.image_newline
    from embedlens.interventions import Engine

    x = Engine(adapter).embed(batch)
    torch.testing.assert_close(x[roles.image_newline], emb.expand(int(roles.image_newline.sum()), -1))


def hf_tester_adapter() -> LlavaNextAdapter:
    """LLaVA-NeXT from the HF tester's values (`tests.support.hf_testers.TESTER_CONFIGS["llava_next"]`, which
    `tests/adapters/test_hf_configs.py` also runs)."""
    adapter = wrap_model(*TESTER_CONFIGS["llava_next"].build(0))
    assert isinstance(adapter, LlavaNextAdapter)
    return adapter


@pytest.fixture(scope="module")
def tester_adapter():
    return hf_tester_adapter()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hf_tester_config_role_map(tester_adapter, padding_side):
    assert tester_adapter.grid() == (8, 8)
    test_roles.test_visual_positions_hold_image_tokens(tester_adapter, padding_side)
    test_roles.test_text_spans_decode_to_what_was_asked(tester_adapter, padding_side)


def test_hf_tester_config_patches_and_features(tester_adapter):
    test_roles.test_row_col_match_the_patch_embedding(tester_adapter)
    test_roles.test_sequence_positions_receive_the_named_features(tester_adapter)
    test_roles.test_newline_tokens_only_where_the_family_has_them(tester_adapter)


def test_hf_tester_config_sites(tester_adapter):
    test_sites.test_llm_sites_equal_hf_hidden_states(tester_adapter, "left")
    test_sites.test_vision_sites_equal_hf_hidden_states(tester_adapter)

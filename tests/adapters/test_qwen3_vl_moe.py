"""Qwen3-VL-MoE: routing under the engine's interventions, and the family proofs on HF's own tester configuration.

The family-wide proofs (sites == HF hidden states, role map, one patch -> one token, planted codes, conformance,
intervention equivalences incl. DeepStack) run on ``tiny:qwen3_vl_moe`` through the parametrised suites; its odd
decoder layers are sparse blocks, so every equivalence there passes through the router.
"""

from __future__ import annotations

import pytest

from embedlens.adapters import Qwen3VLMoeAdapter, load_model, wrap_model
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.testing.images import noise, shapes
from tests import test_roles
from tests.adapters import test_sites
from tests.interventions import test_equivalences
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS
from tests.support.moe import assert_routing_follows_pruned_sequence


@pytest.fixture(scope="module")
def moe():
    return load_model("tiny:qwen3_vl_moe")


def test_routing_follows_the_pruned_sequence(moe):
    """Each sparse block's router sees exactly the tokens present (pruned ones are routed nowhere), and routes
    each of them as in HF's run of the shortened sequence: the (token, expert) choices are HF's."""
    samples = [Sample([shapes(64, seed=1)], question="what is it?", id="a"),
               Sample([noise(40, 70, seed=2)], question="count the shapes", id="b")]
    batch = moe.encode(samples, padding_side="left")
    assert_routing_follows_pruned_sequence(moe, batch, [1, 3])


@pytest.fixture(scope="module")
def tester():
    adapter = wrap_model(*BLOCK_TESTER_CONFIGS["qwen3_vl_moe"].build(0))
    assert type(adapter) is Qwen3VLMoeAdapter
    return adapter


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hf_tester_config_role_map(tester, padding_side):
    test_roles.test_visual_positions_hold_image_tokens(tester, padding_side)
    test_roles.test_text_spans_decode_to_what_was_asked(tester, padding_side)
    test_roles.test_role_kinds_partition_every_position(tester)


def test_hf_tester_config_patch_blocks_and_features(tester):
    test_roles.test_row_col_match_the_patch_embedding(tester)
    test_roles.test_sequence_positions_receive_the_named_features(tester)


def test_hf_tester_config_sites(tester):
    test_sites.test_llm_sites_equal_hf_hidden_states(tester, "left")
    test_sites.test_llm_sites_equal_hf_hidden_states(tester, "right")
    test_sites.test_vision_sites_equal_hf_hidden_states(tester)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hf_tester_config_engine_baseline_and_prune(tester, padding_side):
    """Engine logits equal HF's at batch 3, either padding side; prune equals HF on the shortened sequence with the
    original positions and the kept tokens' DeepStack features."""
    side = int(tester.processor.image_processor.size["longest_edge"] ** 0.5)
    samples = [Sample([noise(side, side, seed=i)], question=q, id=f"s{i}")
               for i, q in enumerate(["what?", "count the shapes", "is it red?"])]
    setup = (tester, tester.encode(samples, padding_side=padding_side), Engine(tester))
    test_equivalences.test_baseline_equals_hf(setup)
    test_equivalences.test_prune_remove_mask_and_hand_cut_agree(setup)

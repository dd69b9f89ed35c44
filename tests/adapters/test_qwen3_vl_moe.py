"""Qwen3-VL-MoE: routing under the engine's interventions, and the family proofs on HF's own tester configuration.

The family-wide proofs (sites == HF hidden states, role map, one patch -> one token, planted codes, conformance,
intervention equivalences incl. DeepStack) run on ``tiny:qwen3_vl_moe`` through the parametrised suites; its odd
decoder layers are sparse blocks, so every equivalence there passes through the router.
"""

from __future__ import annotations

import pytest
import torch

from conftest import hf_run
from embedlens.adapters import Qwen3VLMoeAdapter, load_model, wrap_model
from embedlens.adapters.base import resolve_path
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.interventions.prune import Prune
from embedlens.testing.images import noise, shapes
from tests import test_roles
from tests.adapters import test_sites
from tests.interventions import test_equivalences
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS


@pytest.fixture(scope="module")
def moe():
    return load_model("tiny:qwen3_vl_moe")


def test_routing_follows_the_pruned_sequence(moe):
    """Each sparse block's router sees exactly the tokens present (pruned ones are routed nowhere), and routes
    each of them as in HF's run of the shortened sequence: the (token, expert) choices are HF's."""
    samples = [Sample([shapes(64, seed=1)], question="what is it?", id="a"),
               Sample([noise(40, 70, seed=2)], question="count the shapes", id="b")]
    batch = moe.encode(samples, padding_side="left")
    eng = Engine(moe)
    dead = batch.roles.visual & (torch.arange(batch.input_ids.shape[1]) % 3 == 0)
    layers = resolve_path(moe.model, moe.paths.llm_layers)
    sparse = [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate")]
    assert sparse == [1, 3]
    seen: dict[int, list] = {i: [] for i in sparse}
    hooks = [layers[i].mlp.gate.register_forward_hook(lambda m, a, o, i=i: seen[i].append(o[2])) for i in sparse]
    try:
        out = eng.run(batch, [Prune(tokens="dead")], groups={"dead": dead}.__getitem__)
        engine_routes = {i: seen[i].pop() for i in sparse}
        keep = ~dead & ~batch.roles.padding
        embeds = eng.embed(batch)
        refs = []
        for b in range(2):
            hf_run(moe, batch, b, keep[b], embeds)  # HF on the cut sequence: its routes land in `seen`
            refs.append({i: seen[i].pop() for i in sparse})
    finally:
        for h in hooks:
            h.remove()
    rows = out.counts["rows"]
    width = int(rows[1].max())
    for i in sparse:
        assert engine_routes[i].shape == (2 * width, moe.config.text_config.num_experts_per_tok)
        for b in range(2):
            n = int(keep[b].sum())
            assert int(rows[i][b]) == n
            # the engine packs each sample's present tokens left in its row of `width`
            got = engine_routes[i].view(2, width, -1)[b, :n]
            assert torch.equal(got.sort(-1).values, refs[b][i].sort(-1).values)


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

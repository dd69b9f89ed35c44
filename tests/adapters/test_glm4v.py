"""GLM-4V and GLM-4.5V (mixture of experts): the processor's patch layout on image pixels, the tower's own 2 x 2
merge before its merger, M-RoPE positions by hand and through HF's generation, routing under pruning, and the family
proofs on HF's own tester configurations (GLM-4V's without merge, its 2 x 2-merge variant, GLM-4.5V's).

The family-wide proofs (sites == HF hidden states, role map, one patch -> one token, planted codes, conformance,
intervention equivalences) run on ``tiny:glm4v`` and ``tiny:glm4v_moe`` through the parametrised suites.
"""

from __future__ import annotations

import pytest
import torch

from embedlens.adapters import Glm4vAdapter, Glm4vMoeAdapter, load_model, wrap_model
from embedlens.adapters.base import resolve_path
from embedlens.adapters.capabilities import Capability
from embedlens.data import Sample
from embedlens.errors import InputError
from embedlens.interventions import Engine
from embedlens.roles import Role
from embedlens.sites import Site
from embedlens.testing.images import noise, shapes
from embedlens.tracing import collect
from tests import test_roles
from tests.adapters import test_qwen2_vl, test_sites
from tests.interventions import test_equivalences
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS
from tests.support.moe import assert_routing_follows_pruned_sequence

TESTERS = ("glm4v", "glm4v-merge", "glm4v_moe")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny:glm4v")


def test_patch_rows_follow_the_image_and_come_back_for_figures(tiny):
    """Qwen2-VL's merge-window layout (two temporal copies per row): perturbing one image patch changes exactly the
    row `qwen_patch_row` names, and `display_pixels` puts the rows back into the image."""
    assert tiny.processor.image_processor.temporal_patch_size == 2
    test_qwen2_vl.test_patch_rows_follow_the_image(tiny)
    test_qwen2_vl.test_display_pixels_put_the_patches_back(tiny)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_position_ids_are_mrope_per_sample_alone(tiny, padding_side):
    """M-RoPE ids as written out by hand from the Qwen2-VL rule GLM-4V follows, each sample numbered alone."""
    test_qwen2_vl.test_position_ids_are_mrope_per_sample_alone(tiny, padding_side)


def test_engine_decodes_as_hf_generate(tiny):
    test_qwen2_vl.test_engine_decodes_as_hf_generate(tiny)


def test_tower_merges_each_block_before_the_merger(tiny):
    """`vision.features` (the merger's input) has one row per token: the last block's 4 rows of each 2 x 2 block,
    through the tower's own norm and strided convolution, written here as one matrix product per block."""
    batch = tiny.encode([Sample([shapes(64, seed=0), noise(24, 40, seed=1)], question="what?", id="a")])
    acts = collect(tiny, batch, ["vision.layers[-1]", "vision.features", "projector"])
    last, feats = acts[Site("vision.layers", tiny.n_vision_layers - 1)][0], acts[Site("vision.features")][0]
    n_tokens = sum(h * w for h, w in tiny.image_grids(batch.inputs))
    assert last.shape[0] == 4 * n_tokens and feats.shape[0] == n_tokens == acts[Site("projector")].shape[1]
    visual = tiny.model.model.visual
    with torch.no_grad():
        normed = visual.post_layernorm(last).reshape(n_tokens, 2, 2, -1)  # [tokens, i, j, d]: merge-window order
        w = visual.downsample.weight  # [out, d, 2, 2]
        want = torch.einsum("tijd,odij->to", normed, w) + visual.downsample.bias
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)


def test_grid_is_the_largest_square_the_processor_keeps(tiny):
    """GLM-4V's resize counts two temporal copies against ``longest_edge``: the 2 * 32 * 32 bound keeps 32 x 32 px
    (4 x 4 tokens), which `grid` says; an image larger than that comes back at that grid."""
    ip = tiny.processor.image_processor
    assert ip.size["longest_edge"] == 2 * 32 * 32
    assert tiny.grid() == (4, 4)
    batch = tiny.encode([Sample([shapes(96, seed=0)], question="what?", id="a")])
    assert tiny.image_grids(batch.inputs) == [tiny.grid()]


def test_image_frame_tokens_are_special(tiny):
    batch = tiny.encode([Sample([shapes(32, seed=0)], question="what?", id="a")])
    ids, roles = batch.input_ids[0], batch.roles
    for name in ("image_start_token_id", "image_end_token_id"):
        where = ids == int(getattr(tiny.config, name))
        assert int(where.sum()) == 1 and bool(roles._is(Role.SPECIAL)[0][where].all())
    assert tiny.has(Capability.PRE_PROJECTOR_MERGE) and tiny.has(Capability.MROPE) and tiny.has(Capability.PACKED_TOWER)


def test_video_is_refused_by_name(tiny):
    """GLM-4V's video prompts (frames framed as images with timestamps) are not written: a video sample is refused."""
    assert not tiny.has(Capability.VIDEO)
    with pytest.raises(InputError, match="glm4v does not take video"):
        tiny.encode([Sample(video=[shapes(32, seed=i) for i in range(2)], question="what?", id="v")])


def test_attn_and_mlp_sites_read_the_post_norms(tiny):
    """The decoder layer norms its attention and MLP outputs before each residual add: `.attn` and `.mlp` are
    those normed updates (the norms' outputs in a plain HF forward, read by hooks), so `in + attn + mlp == out`."""
    batch = tiny.encode([Sample([shapes(32, seed=0)], question="what?", id="a")])
    layer = resolve_path(tiny.model, tiny.paths.llm_layers)[1]
    seen = {}
    hooks = [layer.post_self_attn_layernorm.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o)),
             layer.post_mlp_layernorm.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o))]
    try:
        with torch.no_grad():
            tiny.model(**tiny.model_inputs(batch))
    finally:
        for h in hooks:
            h.remove()
    acts = collect(tiny, batch, ["llm.layers[1].attn", "llm.layers[1].mlp"])
    torch.testing.assert_close(acts[Site("llm.layers", 1, "attn")], seen["attn"], atol=1e-6, rtol=0)
    torch.testing.assert_close(acts[Site("llm.layers", 1, "mlp")], seen["mlp"], atol=1e-6, rtol=0)
    test_sites.test_attn_and_mlp_updates_sum_to_the_layer_output(tiny)


def test_moe_routing_follows_the_pruned_sequence():
    """GLM-4.5V's sparse blocks (layers 1-3 of tiny:glm4v_moe) route exactly the tokens present, each as in HF's run
    of the shortened sequence at the original positions: the (token, expert) choices are HF's."""
    moe = load_model("tiny:glm4v_moe")
    samples = [Sample([shapes(64, seed=1)], question="what is it?", id="a"),
               Sample([noise(40, 24, seed=2)], question="count the shapes", id="b")]
    batch = moe.encode(samples, padding_side="left")
    assert_routing_follows_pruned_sequence(moe, batch, [1, 2, 3])


@pytest.fixture(scope="module", params=TESTERS)
def tester(request):
    cfg = BLOCK_TESTER_CONFIGS[request.param]
    adapter = wrap_model(*cfg.build(0))
    assert type(adapter) is {"glm4v": Glm4vAdapter, "glm4v_moe": Glm4vMoeAdapter}[cfg.family]
    return adapter


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hf_tester_config_role_map_and_baseline(tester, padding_side):
    test_roles.test_visual_positions_hold_image_tokens(tester, padding_side)
    test_roles.test_text_spans_decode_to_what_was_asked(tester, padding_side)
    test_roles.test_role_kinds_partition_every_position(tester)
    batch = tester.encode(test_equivalences.prompt_samples()[:2], padding_side=padding_side)  # batch 2
    test_equivalences.test_baseline_equals_hf((tester, batch, Engine(tester)))


def test_hf_tester_config_patch_blocks_and_features(tester):
    test_roles.test_row_col_match_the_patch_embedding(tester)
    test_roles.test_sequence_positions_receive_the_named_features(tester)


def test_hf_tester_config_sites(tester):
    test_sites.test_llm_sites_equal_hf_hidden_states(tester, "left")
    test_sites.test_llm_sites_equal_hf_hidden_states(tester, "right")
    test_sites.test_vision_sites_equal_hf_hidden_states(tester)
    test_sites.test_attn_and_mlp_updates_sum_to_the_layer_output(tester)


def test_hf_tester_config_prune_equivalence(tester):
    # the largest images the tester's processor keeps: the planted groups differ in size per sample
    side = tester.grid()[0] * tester.processor.image_processor.patch_size * tester.merge_size
    samples = [Sample([noise(side, side, seed=i)], question=q, id=f"s{i}") for i, q in enumerate(["what?", "count the shapes", "is it red?"])]
    batch = tester.encode(samples, padding_side="left")
    test_equivalences.test_prune_remove_mask_and_hand_cut_agree((tester, batch, Engine(tester)))
    test_equivalences.test_generation_after_pruning_matches_hand_built((tester, batch, Engine(tester)))

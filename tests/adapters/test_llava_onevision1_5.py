"""LLaVA-OneVision-1.5: the processor's patch layout on image pixels, the tower's class tokens kept out of the
vision sites, 1-D positions as the model counts them, and the family proofs on HF's own tester configuration
(no merge) and its 2 x 2-merge variant.

The family-wide proofs (sites == HF hidden states, role map, one patch -> one token, planted codes, conformance,
intervention equivalences) run on ``tiny:llava_onevision1_5`` through the parametrised suites.
"""

from __future__ import annotations

import pytest
import torch

from embedlens.adapters import LlavaOnevision15Adapter, load_model, wrap_model
from embedlens.adapters.base import resolve_path
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.sites import Site
from embedlens.testing.images import noise, shapes
from embedlens.tracing import collect
from tests import test_roles
from tests.adapters import test_qwen2_vl, test_sites
from tests.interventions import test_equivalences
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS

TESTERS = ("llava_onevision1_5", "llava_onevision1_5-merge")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny:llava_onevision1_5")


def test_patch_rows_follow_the_image_and_come_back_for_figures(tiny):
    """One temporal patch per row (48 values of a 4-px patch): perturbing one image patch changes exactly the row of
    the merge-window order, and `display_pixels` puts the rows back into the image."""
    assert tiny.processor.image_processor.temporal_patch_size == 1
    test_qwen2_vl.test_patch_rows_follow_the_image(tiny)
    test_qwen2_vl.test_display_pixels_put_the_patches_back(tiny)


def test_layout_by_hand(tiny):
    """Images of 64 x 64, 40 x 70 and 48 x 48 px: the processor's rule (sides rounded to 8-px multiples, at most
    32 x 32 px of area, at least 16 x 16) gives token grids written out here; tokens run row-major, each image's
    after the previous images' in the packed merger output."""
    batch = tiny.encode([Sample([shapes(64, seed=0), noise(40, 70, seed=1)], question="what?", id="a"),
                         Sample([shapes(48, seed=2)], question="count", id="b")])
    grids = [(4, 4), (3, 5), (4, 4)]  # 64 -> 32 px; 40 x 70 -> 24 x 40 px (area <= 1024); 48 -> 32 px
    assert tiny.image_grids(batch.inputs) == grids
    first = 0
    for layout, (gh, gw) in zip(tiny.image_layouts(batch.inputs), grids):
        k = torch.arange(gh * gw)
        want = torch.stack([torch.zeros_like(k), k // gw, k % gw, torch.zeros_like(k), first + k], dim=1)
        assert torch.equal(layout, want)
        first += gh * gw


def test_vision_layers_drop_exactly_the_class_rows(tiny):
    """The blocks see a class row before each image; `vision.layers[i]` is the block's output with those rows
    dropped (so its rows are `vision.embed`'s patches), and the class token does reach the patches through attention."""
    batch = tiny.encode([Sample([shapes(64, seed=0), shapes(40, seed=1)], question="what?", id="a")])
    blocks = resolve_path(tiny.model, tiny.paths.vision_layers)
    seen = {}
    handle = blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.clone()))
    try:
        with torch.no_grad():
            tiny.model.model.visual(batch.inputs["pixel_values"], grid_thw=batch.inputs["image_grid_thw"])
    finally:
        handle.remove()
    acts = collect(tiny, batch, ["vision.embed", "vision.layers[0]"])
    n = batch.inputs["image_grid_thw"].prod(-1).tolist()  # 64 and 16 patches
    assert seen["out"].shape[0] == sum(n) + 2
    patches = torch.cat([seen["out"][1 : 1 + n[0]], seen["out"][2 + n[0] :]])  # after each image's class row
    torch.testing.assert_close(acts[Site("vision.layers", 0)][0], patches, atol=0, rtol=0)
    assert acts[Site("vision.embed")].shape[1] == sum(n)
    cls = tiny.model.model.visual.cls_embeddings.class_embedding
    with torch.no_grad():
        saved = cls.clone()
        cls.mul_(-3.0)
        try:
            moved = collect(tiny, batch, ["vision.layers[0]"])[Site("vision.layers", 0)]
        finally:
            cls.copy_(saved)
    assert not torch.allclose(moved, acts[Site("vision.layers", 0)], atol=1e-4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_positions_are_the_models_own_count(tiny, padding_side):
    """1-D positions, no M-RoPE: the engine's baseline equals HF's call with *no* position ids (the model's own
    ``arange``), which relative rotary makes equal to each sample's own count, padding excluded."""
    batch = tiny.encode(test_equivalences.prompt_samples()[:2], padding_side=padding_side)
    pos = tiny.position_ids(batch.inputs)
    assert pos.shape == batch.input_ids.shape
    valid = ~batch.roles.padding
    for b in range(2):
        assert pos[b][valid[b]].tolist() == list(range(int(valid[b].sum())))
    with torch.no_grad():
        ref = tiny.model(**tiny.model_inputs(batch)).logits
    torch.testing.assert_close(Engine(tiny).run(batch).logits()[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=TESTERS)
def tester(request):
    adapter = wrap_model(*BLOCK_TESTER_CONFIGS[request.param].build(0))
    assert type(adapter) is LlavaOnevision15Adapter
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
    # the largest images the tester's processor keeps (9 tokens each): the planted groups differ in size per sample
    side = int(tester.processor.image_processor.size["longest_edge"] ** 0.5)
    samples = [Sample([noise(side, side, seed=i)], question=q, id=f"s{i}") for i, q in enumerate(["what?", "count the shapes", "is it red?"])]
    batch = tester.encode(samples, padding_side="left")
    test_equivalences.test_prune_remove_mask_and_hand_cut_agree((tester, batch, Engine(tester)))
    test_equivalences.test_generation_after_pruning_matches_hand_built((tester, batch, Engine(tester)))

"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the processor's patch layout proved on image pixels, M-RoPE position ids
against a hand computation and HF's own generation, Qwen2.5-VL's window order, and the family proofs on HF's
own tester configurations.

The family-wide proofs (sites == HF hidden states, role map, one patch -> one token of the 2 x 2 merger,
planted codes, conformance, intervention equivalences incl. DeepStack) run on ``tiny:qwen2_vl``,
``tiny:qwen2_5_vl`` and ``tiny:qwen3_vl`` through the parametrised suites.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens.adapters.capabilities import Capability
from embedlens.adapters import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter, load_model, wrap_model
from embedlens.adapters.base import resolve_path
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.sites import Site
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS
from embedlens.testing.images import noise, shapes
from embedlens.tracing import collect
from tests import test_roles
from tests.adapters import test_sites
from tests.test_roles import qwen_patch_row

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module", params=QWEN)
def qwen(request):
    return load_model(f"tiny:{request.param}")


def test_patch_rows_follow_the_image(qwen):
    """Perturb one patch of the *image* (an image the processor does not resize: 24 x 40 px, multiples of 8):
    exactly the `pixel_values` row `qwen_patch_row` names changes, and the role map puts that patch in the token
    at (row // 2, col // 2)."""
    p = qwen.processor.image_processor.patch_size
    base = (np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8)
    enc = lambda a: qwen.encode([Sample([Image.fromarray(a)], question="what is it?", id="s")])  # noqa: E731
    ref = enc(base)
    assert ref.inputs["image_grid_thw"].tolist() == [[1, 24 // p, 40 // p]]
    vt = ref.roles.visual_tokens()
    for pr, pc in ((0, 0), (1, 2), (5, 9), (4, 7)):
        img = base.copy()
        img[pr * p : (pr + 1) * p, pc * p : (pc + 1) * p] = 255 - img[pr * p : (pr + 1) * p, pc * p : (pc + 1) * p]
        changed = (enc(img).inputs["pixel_values"] - ref.inputs["pixel_values"]).abs().amax(-1).nonzero().flatten().tolist()
        assert changed == [qwen_patch_row(0, 40 // p, pr, pc)], (pr, pc, changed)
        # one token of the role map sits at that patch's 2 x 2 block; test_roles' packed branch then proves, on
        # the model, that this row's patch reaches exactly that token
        assert int(((vt["row"] == pr // 2) & (vt["col"] == pc // 2)).sum()) == 1


def test_display_pixels_put_the_patches_back(qwen):
    """The figure's image: `pixel_values` rows (merge-window order) put back in place give the image itself."""
    img = (np.random.default_rng(1).random((24, 40, 3)) * 255).astype(np.uint8)
    batch = qwen.encode([Sample([shapes(32, seed=0), Image.fromarray(img)], question="what is it?", id="s")])
    from embedlens.probes._util import display_pixels

    shown = display_pixels(qwen, batch.inputs, feature_row=0, image=1)  # [H, W, 3] in 0..1
    torch.testing.assert_close(shown, torch.tensor(img / 255.0, dtype=torch.float32), atol=2e-2, rtol=0)


def _hand_positions(ids: list[int], image_token: int, grids: list[tuple[int, int]]) -> torch.Tensor:
    """M-RoPE ids written out from the Qwen2-VL paper: text counts on in all three; an image of h x w tokens
    starting at s gets (s, s + row, s + col); the text after it resumes at s + max(h, w)."""
    out, pos, k, i = [], 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token:
            out.append((pos, pos, pos))
            pos, i = pos + 1, i + 1
            continue
        h, w = grids[k]
        out += [(pos, pos + r, pos + c) for r in range(h) for c in range(w)]
        pos, i, k = pos + max(h, w), i + h * w, k + 1
    return torch.tensor(out).T


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_position_ids_are_mrope_per_sample_alone(qwen, padding_side):
    samples = [Sample([noise(40, 70, seed=1), shapes(48, seed=2)], question="count the shapes", id="a"),
               Sample([shapes(64, seed=3)], question="what?", id="b")]
    batch = qwen.encode(samples, padding_side=padding_side)
    pos = qwen.position_ids(batch.inputs)
    assert pos.shape == (3, *batch.input_ids.shape)
    grids = iter(qwen.image_grids(batch.inputs))
    for b, s in enumerate(samples):
        valid = batch.inputs["attention_mask"][b].bool()
        want = _hand_positions(batch.input_ids[b][valid].tolist(), qwen.image_token_id, [next(grids) for _ in s.images])
        assert torch.equal(pos[:, b, valid], want)
        alone = qwen.encode([s])
        assert torch.equal(qwen.position_ids(alone.inputs)[:, 0], want)  # padding does not count


def test_engine_decodes_as_hf_generate(qwen):
    """Greedy decoding continues at each sample's largest position + 1 (HF's rope_deltas): the engine's
    generation equals HF's own `generate` on a left-padded batch."""
    samples = [Sample([noise(40, 70, seed=1)], question="what colour is the big square on the left?", id="a"),
               Sample([shapes(64, seed=3)], question="count", id="b")]
    batch = qwen.encode(samples, padding_side="left")
    ours = Engine(qwen).run(batch, cache=True).generate(4)
    with torch.no_grad():
        ref = qwen.model.generate(**qwen.model_inputs(batch), max_new_tokens=4, do_sample=False)[:, batch.input_ids.shape[1]:]
    assert torch.equal(ours, ref)


def test_qwen2_5_sites_are_in_the_towers_window_order():
    """Tiny Qwen2.5-VL windows are 2 x 2 tokens, so a 4 x 4-token image spans four: its tokens' rows of the merger
    output are the model's window order, and `vision.embed` is what the first block receives."""
    adapter = load_model("tiny:qwen2_5_vl")
    batch = adapter.encode([Sample([shapes(64, seed=1)], question="what?", id="a")])
    order = adapter.token_order(batch.inputs)
    assert not torch.equal(order, torch.arange(len(order)))  # the windows do reorder this image
    seen = {}
    blocks = resolve_path(adapter.model, adapter.paths.vision_layers)

    def grab(module, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        acts = collect(adapter, batch, ["vision.embed", "llm.embed", "projector"])
    finally:
        handle.remove()
    torch.testing.assert_close(acts[Site("vision.embed")][0], seen["in"], atol=0, rtol=0)
    vt = batch.roles.visual_tokens()
    torch.testing.assert_close(acts[Site("llm.embed")][0, vt["position"]], acts[Site("projector")][0, vt["feature_col"]], atol=0, rtol=0)


def test_engine_refuses_positions_the_adapter_does_not_declare(qwen, monkeypatch):
    from embedlens.errors import AdapterError

    batch = qwen.encode([Sample([shapes(32)], question="what?", id="a")])
    monkeypatch.setattr(qwen, "capabilities", qwen.capabilities - {Capability.MROPE})
    with pytest.raises(AdapterError, match=r"position_ids gave shape \(3, 1, \d+\); the adapter declares \[batch, seq\]"):
        Engine(qwen).run(batch)


def test_unsupported_video_and_errors(qwen):
    bad = dict(qwen.encode([Sample([shapes(32)], question="what?", id="a")]).inputs)
    bad["image_grid_thw"] = torch.tensor([[2, 4, 4]])
    with pytest.raises(Exception, match=r"2 temporal patches"):
        qwen.image_layouts(bad)
    bad.pop("image_grid_thw")
    with pytest.raises(Exception, match=r"no image_grid_thw"):
        qwen.image_layouts(bad)


@pytest.fixture(scope="module", params=QWEN)
def tester(request):
    cfg = BLOCK_TESTER_CONFIGS[request.param]
    adapter = wrap_model(*cfg.build(0))
    want = {"qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen2_5_VLAdapter, "qwen3_vl": Qwen3VLAdapter}[request.param]
    assert type(adapter) is want
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
    test_sites.test_vision_sites_equal_hf_hidden_states(tester)


def test_hf_tester_config_prune_equivalence(tester):
    from tests.interventions import test_equivalences

    # the largest images the tester's processor keeps (9 tokens each): the planted groups differ in size per sample
    side = int(tester.processor.image_processor.size["longest_edge"] ** 0.5)
    samples = [Sample([noise(side, side, seed=i)], question=q, id=f"s{i}") for i, q in enumerate(["what?", "count the shapes", "is it red?"])]
    batch = tester.encode(samples, padding_side="left")
    test_equivalences.test_prune_remove_mask_and_hand_cut_agree((tester, batch, Engine(tester)))
    test_equivalences.test_generation_after_pruning_matches_hand_built((tester, batch, Engine(tester)))

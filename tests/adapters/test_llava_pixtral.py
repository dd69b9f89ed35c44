"""Pixtral-12B (`LlavaForConditionalGeneration` with a Pixtral tower): chosen from the config's tower, the image
span and its markers as the processor writes them, each visual token filled with the row HF's own
`get_image_features` gives, engine logits and pruning against HF on the testers' values, and clear refusals of
the pairings that do not fit.

The family-wide proofs (sites, role map with left/right padding and several images, one pixel patch -> exactly
its token, planted codes, conformance, intervention equivalences, examples) run on ``tiny:llava_pixtral`` through
the parametrised suites, and on the testers' values in ``tests/adapters/test_hf_configs.py``
(``BLOCK_TESTER_CONFIGS["llava_pixtral"]``, ``["llava_pixtral-window"]``).
"""

from __future__ import annotations

import pytest
import torch

from conftest import get_adapter, hf_run
from embedlens.adapters import load_model, wrap_model
from embedlens.data import Sample
from embedlens.errors import AdapterError
from embedlens.interventions import Engine
from embedlens.interventions.prune import Prune
from embedlens.sites import Site
from embedlens.testing import save_tiny_model, tiny_model
from embedlens.testing.images import noise, shapes
from embedlens.tracing import collect
from tests.adapters import test_mistral3
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS

TOL = 1e-4  # the bound for engine logits against HF's
_CACHE: dict[str, object] = {}


@pytest.fixture(scope="module")
def adapter():
    return get_adapter("llava_pixtral")


def _tester(name: str):
    if name not in _CACHE:
        _CACHE[name] = wrap_model(*BLOCK_TESTER_CONFIGS[name].build(0))
    return _CACHE[name]


def test_the_adapter_follows_the_tower(tmp_path):
    """The same architecture, LlavaForConditionalGeneration, loads as ``llava_pixtral`` with a Pixtral tower and
    as ``llava`` with a CLIP one, from a saved folder (the config) and from a built model."""
    pixtral = save_tiny_model("llava_pixtral", tmp_path / "pixtral")
    clip = save_tiny_model("llava-clip", tmp_path / "clip")
    assert load_model(str(pixtral)).name == "llava_pixtral"
    assert load_model(str(clip)).name == "llava"
    assert wrap_model(*tiny_model("llava_pixtral")).name == "llava_pixtral"


def test_forced_adapters_that_do_not_fit_the_tower_are_refused(tmp_path):
    """Forcing ``llava`` on Pixtral-12B's layout (once a raw ``no module at 'model.vision_tower.embeddings'``) or
    ``llava_pixtral`` on a CLIP tower names the tower and the adapter that takes it."""
    model, processor = tiny_model("llava_pixtral")
    with pytest.raises(AdapterError, match=r"adapter 'llava' does not fit this LlavaForConditionalGeneration: its vision "
                                           r"tower is 'pixtral'; adapter 'llava' takes 'clip_vision_model' or 'siglip_vision_model'"):
        wrap_model(model, processor, adapter="llava")
    pixtral = save_tiny_model("llava_pixtral", tmp_path / "pixtral")
    with pytest.raises(AdapterError, match=r"its vision tower is 'pixtral'"):
        load_model(str(pixtral), adapter="llava")
    with pytest.raises(AdapterError, match=r"adapter 'llava_pixtral' does not fit .*its vision tower is 'clip_vision_model'; "
                                           r"adapter 'llava_pixtral' takes 'pixtral'"):
        wrap_model(*tiny_model("llava-clip"), adapter="llava_pixtral")


def test_a_llava_tower_no_adapter_takes_gets_the_listing_error():
    """A LLaVA with a tower no adapter serves gets the unsupported-architecture error (why, and the list), not a
    missing module."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from embedlens.adapters import ADDING_A_FAMILY

    vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                  num_attention_heads=4, patch_size=8, num_patches=16)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=dict(
        model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)))
    with pytest.raises(AdapterError) as e:
        wrap_model(model, tiny_model("llava-clip")[1])
    msg = str(e.value)
    assert msg.startswith("No adapter supports architecture LlavaForConditionalGeneration (its vision tower is "
                          "'siglip2_vision_model'; adapter 'llava' takes ")
    assert "adapter 'llava_pixtral' takes 'pixtral'" in msg and msg.endswith(ADDING_A_FAMILY)


def test_configurations_the_model_cannot_fill_are_refused():
    """"default" feature selection would drop the first patch of the packed sequence; a processor that merges
    patches writes fewer [IMG] tokens than LLaVA's projector gives features."""
    model, processor = tiny_model("llava_pixtral")
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(AdapterError, match=r"vision_feature_select_strategy must be 'full' with a Pixtral tower.*got 'default'"):
        wrap_model(model, processor)
    model.config.vision_feature_select_strategy = "full"
    processor.spatial_merge_size = 2
    with pytest.raises(AdapterError, match=r"spatial_merge_size must be 1 .*got 2"):
        wrap_model(model, processor)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_layout_follows_the_processors_rule_and_its_markers(adapter, padding_side):
    """Each image's grid is the processor's resize rule in whole patches (one token per patch), the prompt's
    ``[IMG]`` runs and ``[IMG_BREAK]`` / ``[IMG_END]`` markers give every token its (row, col): Mistral 3's test,
    run with this family's merge size of 1."""
    assert adapter.merge_size == 1 and adapter.patch_block == (1, 1)
    test_mistral3.test_layout_follows_the_processors_rule_and_its_markers(adapter, padding_side)


@pytest.mark.parametrize("name", ["tiny", "llava_pixtral", "llava_pixtral-window"])
def test_each_visual_token_holds_the_row_hf_scattered(adapter, name):
    """`llm.embed` at the ``[IMG]`` positions is, in sequence order, the model's own `get_image_features` output
    (image by image, as it splits them by ``image_sizes``); the markers keep their token embeddings."""
    a = adapter if name == "tiny" else _tester(name)
    batch = a.encode([Sample([noise(40, 70, seed=1), shapes(28, seed=2)], question="what is it?", id="a"),
                      Sample([noise(24, 24, seed=3)], question="count", id="b")], padding_side="left")
    embeds = collect(a, batch, ["llm.embed"])[Site("llm.embed")]
    with torch.no_grad():
        feats = a.model.model.get_image_features(batch.inputs["pixel_values"], image_sizes=batch.inputs["image_sizes"],
                                                 vision_feature_layer=a.config.vision_feature_layer,
                                                 vision_feature_select_strategy="full").pooler_output
        table = a.model.get_input_embeddings()(batch.input_ids)
    assert len(feats) == 3 and [len(f) for f in feats] == [h * w for h, w in a.image_grids(batch.inputs)]
    visual = batch.roles.visual
    assert torch.equal(visual, batch.input_ids == a.image_token_id)
    torch.testing.assert_close(embeds[visual], torch.cat(feats), atol=1e-6, rtol=0)
    torch.testing.assert_close(embeds[~visual], table[~visual], atol=0, rtol=0)


def _two():
    return [Sample([noise(20, 20, seed=1), shapes(30, seed=2)], question="what is in the picture?", id="a"),
            Sample([noise(12, 30, seed=3)], question="count", id="b")]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", ["llava_pixtral", "llava_pixtral-window"])
def test_engine_baseline_equals_hf_at_batch_two(name, padding_side):
    """Engine logits == the model's own at every real position, batch 2, both paddings; on the window variant
    every prompt is longer than the window (3), so the engine's window is the one that bites."""
    a = _tester(name)
    batch = a.encode(_two(), padding_side=padding_side)
    eng = Engine(a)
    valid = ~batch.roles.padding
    if name.endswith("window"):
        assert eng.windows == [3] * a.n_llm_layers and int(valid.sum(1).min()) > 3
    else:
        assert eng.windows == [None] * a.n_llm_layers
    with torch.no_grad():
        ref = a.model(**a.model_inputs(batch), position_ids=a.position_ids(batch.inputs)).logits
    torch.testing.assert_close(eng.run(batch).logits()[valid], ref[valid], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llava_pixtral", "llava_pixtral-window"])
def test_prune_equals_hf_on_the_shortened_sequence(name):
    """Pruning a different number of visual tokens per sample (batch 2, left padding) == HF run on each sample's
    kept rows at their original position ids."""
    a = _tester(name)
    batch = a.encode(_two(), padding_side="left")
    gen = torch.Generator().manual_seed(0)
    group = batch.roles.visual & (torch.rand(batch.roles.visual.shape, generator=gen) < 0.3)
    assert int(group[0].sum()) != int(group[1].sum()) > 0
    eng = Engine(a)
    out = eng.run(batch, [Prune(tokens="dead")], groups={"dead": group}.__getitem__)
    keep = ~group & ~batch.roles.padding
    embeds = eng.embed(batch)
    for b in range(2):
        ref = hf_run(a, batch, b, keep[b], embeds).logits[0]
        torch.testing.assert_close(out.logits()[b][keep[b]], ref, atol=TOL, rtol=0)

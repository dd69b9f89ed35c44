"""Molmo2 on HF's tester configuration (``BLOCK_TESTER_CONFIGS["molmo2"]``) and on ``tiny:molmo2``: the image span
against the processor's own rule, every LLM and vision site against HF's hidden states, each visual token's added row
against HF's own image features, patch blocks (across crops) by perturbation, the engine's logits and pruning against
HF with the bidirectional image block, and the refusals.

The family-wide suites (role map, conformance, intervention equivalences, examples) run on ``tiny:molmo2`` through
their parametrisation; the image processor is checked against HF's own code in ``tests/adapters/test_molmo2_crops.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import get_adapter, hf_run
from embedlens.adapters import load_model, wrap_model
from embedlens.adapters.molmo2 import MARKERS
from embedlens.data import Sample
from embedlens.errors import AdapterError
from embedlens.interventions import Engine
from embedlens.interventions.prune import Prune
from embedlens.roles import Role
from embedlens.sites import Site
from embedlens.testing.images import noise, shapes
from embedlens.tracing import collect
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS

TOL = 1e-4  # the bound for engine logits against HF's
SITE_TOL = dict(atol=1e-5, rtol=1e-5)
_CACHE: dict[str, object] = {}
NAMES = ["tiny", "molmo2"]


def _get(name: str):
    if name == "tiny":
        return get_adapter("molmo2")
    if name not in _CACHE:
        _CACHE[name] = wrap_model(*BLOCK_TESTER_CONFIGS[name].build(0))
    return _CACHE[name]


def _two(name: str):
    """Two samples, the first with two images: on the tester, a 300 x 500 image cut into several 378-px crops."""
    big, small = ((300, 500), (200, 260)) if name != "tiny" else ((40, 70), (20, 45))
    return [Sample([noise(*big, seed=1), shapes(small[0], seed=2)], question="what is in the picture?", id="a"),
            Sample([noise(*small, seed=3)], question="count", id="b")]


def _image_inputs(adapter, batch) -> dict:
    inputs = adapter.model_inputs(batch)
    return {k: inputs[k] for k in ("pixel_values", "image_token_pooling", "image_grids", "image_num_crops")}


# -- the image span ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", NAMES)
def test_layout_follows_the_processors_rule_and_its_markers(name, padding_side):
    """The text each image becomes is `Molmo2Processor.replace_image_token`'s; the ``<im_patch>`` tokens are VISUAL,
    the markers SPECIAL; the tokens run over the low-res view (tile 0) then the high-res one (tile 1), row-major, and
    their feature_col counts the batch's tokens in order; the image grids are the image processor's."""
    a = _get(name)
    samples = _two(name)
    batch = a.encode(samples, padding_side=padding_side)
    grids = batch.inputs["image_grids"]
    theirs = a.processor.image_processor([im for s in samples for im in s.images], return_tensors="pt")
    assert torch.equal(grids, theirs["image_grids"]) and int(batch.inputs["image_num_crops"].max()) > 2
    roles, image, first = batch.roles, 0, 0
    for b, s in enumerate(samples):
        for i in range(len(s.images)):
            lr, lc, hr, hc = grids[image].tolist()
            assert a.placeholder_text(batch.inputs, image, lr * lc + hr * hc) == a.processor.replace_image_token(batch.inputs, image)
            sel = (roles.image[b] == i) & roles.visual[b]
            want = [(0, r, c) for r in range(lr) for c in range(lc)] + [(1, r, c) for r in range(hr) for c in range(hc)]
            assert list(zip(roles.tile[b][sel].tolist(), roles.row[b][sel].tolist(), roles.col[b][sel].tolist())) == want
            assert roles.feature_col[b][sel].tolist() == list(range(first, first + len(want)))
            assert (roles.feature_row[b][sel] == 0).all()
            first += len(want)
            image += 1
    patch = a.tokenizer.convert_tokens_to_ids("<im_patch>")
    assert torch.equal(roles.visual, batch.input_ids == patch)
    markers = torch.isin(batch.input_ids, torch.tensor(a.tokenizer.convert_tokens_to_ids(list(MARKERS[1:]))))
    assert int(markers.sum()) > 0 and (roles.kind[markers] == Role.SPECIAL).all()
    question = a.tokenizer.decode(batch.input_ids[0][roles.kind[0] == Role.QUESTION])
    assert question.replace(" ", "") == "whatisinthepicture?"
    # the block the model builds: the tokens HF's processor marks as image, i.e. <im_patch> and the markers
    assert torch.equal(a.block_ids(batch.inputs) == 0, roles.visual | markers)
    assert torch.equal(batch.inputs["mm_token_type_ids"].bool(), roles.visual | markers)


# -- sites ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_llm_sites_equal_hf_hidden_states(name):
    a = _get(name)
    batch = a.encode(_two(name), padding_side="left")
    n = a.n_llm_layers
    sites = ["llm.norm", "llm.unembed"] + [f"llm.layers[{i}].in" for i in range(n)] + [f"llm.layers[{i}]" for i in range(n)]
    acts = collect(a, batch, sites)
    with torch.no_grad():
        ref = a.model(**a.model_inputs(batch), output_hidden_states=True)
    hs = ref.hidden_states  # hs[i] enters decoder layer i; hs[n] is after the final norm
    for i in range(n):
        torch.testing.assert_close(acts[Site("llm.layers", i, "in")], hs[i], **SITE_TOL)
    for i in range(n - 1):
        torch.testing.assert_close(acts[Site("llm.layers", i)], hs[i + 1], **SITE_TOL)
    torch.testing.assert_close(acts[Site("llm.norm")], hs[n], **SITE_TOL)
    torch.testing.assert_close(acts[Site("llm.unembed")], ref.logits, **SITE_TOL)


@pytest.mark.parametrize("name", NAMES)
def test_each_visual_token_gets_the_row_hf_adds(name):
    """`llm.embed` at an ``<im_patch>`` token is that token's embedding PLUS, in sequence order, the model's own
    `get_image_features` row, which is the row the role map names (``projector[0, feature_col]``); every other
    position is its token's embedding."""
    a = _get(name)
    batch = a.encode(_two(name), padding_side="left")
    acts = collect(a, batch, ["llm.embed", "projector"])
    embeds = acts[Site("llm.embed")]
    with torch.no_grad():
        feats = torch.cat(a.model.get_image_features(**_image_inputs(a, batch)).pooler_output)
        table = a.model.get_input_embeddings()(batch.input_ids)
    visual, roles = batch.roles.visual, batch.roles
    named = acts[Site("projector")][roles.feature_row[visual], roles.feature_col[visual]]
    assert bool((feats != 0).any(-1).all())
    torch.testing.assert_close(named, feats, atol=0, rtol=0)
    torch.testing.assert_close(embeds[visual], table[visual] + feats, atol=0, rtol=0)  # as the model adds them
    torch.testing.assert_close(embeds[~visual], table[~visual], atol=0, rtol=0)
    if name == "tiny":  # its adapter's rows are of the embeddings' size (the tester's random ones are ~1e-9)
        assert float(feats.norm(dim=-1).mean()) > 0.5 * float(table[visual].norm(dim=-1).mean())


@pytest.mark.parametrize("name", NAMES)
def test_vision_sites_equal_hf(name):
    """``vision.embed`` and ``vision.layers[i]`` are HF's tower hidden states with the crops packed into one row;
    ``vision.features`` is the adapter's attention-pooled rows (the MLP's input), ``projector`` its output."""
    a = _get(name)
    batch = a.encode(_two(name))
    n = a.n_vision_layers
    acts = collect(a, batch, ["vision.embed", "vision.features", "projector"] + [f"vision.layers[{i}]" for i in range(n)])
    tower, pooler = a.model.model.vision_tower, a.model.model.multi_modal_projector
    seen = {}
    handle = pooler.image_projector.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.no_grad():
            hs = tower(batch.inputs["pixel_values"], output_hidden_states=True).hidden_states
            a.model.get_image_features(**_image_inputs(a, batch))
    finally:
        handle.remove()
    assert len(hs) == n + 1
    crops, patches = batch.inputs["pixel_values"].shape[:2]
    torch.testing.assert_close(acts[Site("vision.embed")], hs[0].reshape(1, crops * patches, -1), **SITE_TOL)
    for i in range(n):
        torch.testing.assert_close(acts[Site("vision.layers", i)], hs[i + 1].reshape(1, crops * patches, -1), **SITE_TOL)
    torch.testing.assert_close(acts[Site("vision.features")], seen["x"][None], **SITE_TOL)
    torch.testing.assert_close(acts[Site("projector")], seen["y"][None], **SITE_TOL)


# -- patch blocks -------------------------------------------------------------------------------------------------
def test_a_patch_reaches_exactly_the_tokens_whose_pooling_reads_it():
    """tiny: changing one pixel patch of one crop in ``pixel_values`` changes exactly one row of ``vision.embed`` (the
    crop's patch, packed); raising that patch's row of the features the pooling takes (the tower's selected layers)
    changes exactly the projector rows of the tokens whose `patch_indices` hold it: one token for a kept patch
    (several crops' patches reach one token on a seam), none for a patch inside an overlap margin that the pooling
    skips. Covers the low-res crop, a token that pools patches of two crops, and a margin patch."""
    patch_blocks_by_perturbation(_get("tiny"))


def patch_blocks_by_perturbation(a) -> None:
    """The proof above on adapter `a` (a Molmo2; tests/test_roles.py runs it on every tiny Molmo2)."""
    batch = a.encode([Sample([noise(40, 70, seed=5)], question="what is it?", id="s")])
    vt = batch.roles.visual_tokens()
    pv = batch.inputs["pixel_values"]
    crops, patches = pv.shape[:2]
    table = a.patch_indices(vt["feature_col"], batch.inputs)  # [tokens, 4]
    n_crops_of = (table // patches).unsqueeze(-1) == torch.arange(crops)
    spans = n_crops_of.any(1).sum(-1)
    assert int(spans.max()) >= 2  # some token pools patches of two or more crops
    straddling = int((spans >= 2).nonzero()[0])
    kept = set(table.flatten().tolist())
    margin = next(r for r in range(patches, crops * patches) if r not in kept)  # a high-res patch no token reads
    rows = [0, patches - 1, int(table[straddling, 0]), int(table[straddling, -1]), margin]
    base = collect(a, batch, ["vision.embed", "projector"])
    pooler = a.model.model.multi_modal_projector  # takes the tower's patch features, [crops, patches, d * layers]
    for row in rows:
        crop, p = divmod(row, patches)
        changed = pv.clone()
        changed[crop, p] += 1.0
        batch.inputs["pixel_values"] = changed
        try:
            emb = collect(a, batch, ["vision.embed"])[Site("vision.embed")]
        finally:
            batch.inputs["pixel_values"] = pv
        assert (emb - base[Site("vision.embed")]).abs().amax(-1).nonzero().tolist() == [[0, row]]

        def bump(m, args, row=row):
            h = args[0].clone()
            h.view(-1, h.shape[-1])[row] += 1.0
            return (h, *args[1:])

        handle = pooler.register_forward_pre_hook(bump)
        try:
            out = collect(a, batch, ["projector"])[Site("projector")]
        finally:
            handle.remove()
        got = (out - base[Site("projector")]).abs().amax(-1)[0].nonzero().flatten().tolist()
        want = (table == row).any(-1).nonzero().flatten().tolist()
        assert got == want, (row, got, want)
        assert (len(want) == 1) == (row != margin)


# -- the engine ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", NAMES)
def test_engine_baseline_equals_hf_at_batch_two(name, padding_side):
    """Engine logits == the model's own at every real position (batch 2, both paddings), with every image token of
    a sample in one bidirectional block (the model's mask from ``mm_token_type_ids``)."""
    a = _get(name)
    batch = a.encode(_two(name), padding_side=padding_side)
    valid = ~batch.roles.padding
    with torch.no_grad():
        ref = a.model(**a.model_inputs(batch), position_ids=a.position_ids(batch.inputs)).logits
        causal = a.model(**{k: v for k, v in a.model_inputs(batch).items() if k != "mm_token_type_ids"},
                         position_ids=a.position_ids(batch.inputs)).logits
    assert (causal[valid] - ref[valid]).abs().max() > 1e-3  # the block matters: without it the logits differ
    torch.testing.assert_close(Engine(a).run(batch).logits()[valid], ref[valid], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_prune_equals_hf_on_the_shortened_sequence(name):
    """Pruning a different number of visual tokens per sample (batch 2, left padding) == HF run on each sample's kept
    rows at their original position ids, the kept image tokens still one bidirectional block (their
    ``mm_token_type_ids``): the model's own definition of that sequence."""
    a = _get(name)
    batch = a.encode(_two(name), padding_side="left")
    gen = torch.Generator().manual_seed(0)
    group = batch.roles.visual & (torch.rand(batch.roles.visual.shape, generator=gen) < 0.4)
    assert int(group[0].sum()) != int(group[1].sum()) > 0
    eng = Engine(a)
    out = eng.run(batch, [Prune(tokens="dead")], groups={"dead": group}.__getitem__)
    embeds = eng.embed(batch)
    keep = ~group & ~batch.roles.padding
    for b in range(2):
        ref = hf_run(a, batch, b, keep[b], embeds)
        torch.testing.assert_close(out.logits()[b][keep[b]], ref.logits[0], atol=TOL, rtol=0)


# -- refusals and loading -----------------------------------------------------------------------------------------
def test_the_engine_refuses_layers_with_different_rotary_tables():
    """Scaling the rotary table of layer 0 only (``rope_scaling_layers=[0]``, a linear scaling): traces run (the
    model's own forward), the engine refuses by name; with the default rope type both tables are one and it runs."""
    from transformers import Molmo2ForConditionalGeneration

    a = _get("tiny")
    cfg = a.config.__class__.from_dict(a.config.to_dict())
    cfg.text_config.rope_scaling_layers = [0]
    cfg.text_config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    scaled = wrap_model(Molmo2ForConditionalGeneration(cfg).eval(), a.processor)
    with pytest.raises(AdapterError, match=r"rotates layers \[0\] with a scaled rotary table \('linear'\)"):
        Engine(scaled)
    batch = scaled.encode(_two("tiny")[1:])
    assert collect(scaled, batch, ["llm.layers[0]"])[Site("llm.layers", 0)].shape[0] == 1
    cfg.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    Engine(wrap_model(Molmo2ForConditionalGeneration(cfg).eval(), a.processor))


@pytest.mark.parametrize("change", [dict(norm_after=True), dict(qk_norm_type="olmo")])
def test_the_post_norm_variant_is_refused(change):
    from transformers import Molmo2ForConditionalGeneration

    a = _get("tiny")
    cfg = a.config.__class__.from_dict(a.config.to_dict())
    for k, v in change.items():
        setattr(cfg.text_config, k, v)
    with pytest.raises(AdapterError, match="the adapter serves the pre-norm one"):
        wrap_model(Molmo2ForConditionalGeneration(cfg).eval(), a.processor)


def test_a_saved_checkpoint_loads_without_torchvision(tmp_path):
    """A folder written by ``save_pretrained`` (HF's processor config names `Molmo2ImageProcessor`, which needs
    torchvision) loads with the torchvision-free processor, the same settings, and gives the same logits."""
    a = _get("tiny")
    a.model.save_pretrained(tmp_path)
    a.processor.save_pretrained(tmp_path)
    b = load_model(str(tmp_path))
    assert b.name == "molmo2"
    ip, jp = a.processor.image_processor, b.processor.image_processor
    assert (jp.size, jp.patch_size, jp.max_crops, jp.overlap_margins, jp.pooling_size, jp.image_mean) == \
        (ip.size, ip.patch_size, ip.max_crops, ip.overlap_margins, ip.pooling_size, ip.image_mean)
    batch = a.encode(_two("tiny"))
    again = b.encode(_two("tiny"))
    assert torch.equal(batch.input_ids, again.input_ids)
    with torch.no_grad():
        torch.testing.assert_close(b.model(**b.model_inputs(again)).logits, a.model(**a.model_inputs(batch)).logits,
                                   atol=1e-5, rtol=0)


def test_display_pixels_are_the_low_res_crop():
    a = _get("tiny")
    arr = (np.random.default_rng(2).random((28, 28, 3)) * 255).astype(np.uint8)  # one crop's size: nothing resized
    batch = a.encode([Sample([Image.fromarray(arr)], question="what is it?", id="s")])
    x = (torch.from_numpy(arr).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(a.display_pixels(batch.inputs, 0, 0), x.permute(2, 0, 1), atol=1e-5, rtol=0)

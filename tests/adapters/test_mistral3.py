"""Mistral 3 / Pixtral: the image span against the processor's own rule and its marker tokens, the markers left
unfilled, the packed tower's patch layout proved on image pixels, the patch merger's blocks (odd grids included),
and the sliding window of the language model.

The family-wide proofs (sites == HF hidden states, role map with left/right padding and several images, one pixel
patch -> one patch -> exactly the token of its merged block, planted codes, conformance, intervention equivalences)
run on ``tiny:mistral3`` through the parametrised suites, and on HF's ``Mistral3VisionText2TextModelTester`` values
in ``tests/adapters/test_hf_configs.py`` (``BLOCK_TESTER_CONFIGS["mistral3"]``, ``["mistral3-window"]``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.pixtral.image_processing_pil_pixtral import get_resize_output_image_size

from conftest import get_adapter
from embedlens.adapters import wrap_model
from embedlens.adapters.base import resolve_path
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.roles import Role
from embedlens.sites import Site
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS
from embedlens.testing.images import noise, shapes
from embedlens.tracing import collect

# (height, width): square, wide, tall, very wide, sizes that are no multiple of a patch, one already in whole blocks
SIZES = ((64, 64), (40, 70), (70, 40), (20, 100), (17, 50), (32, 48))


@pytest.fixture(scope="module")
def adapter():
    return get_adapter("mistral3")


def _ids(adapter, token: str) -> int:
    return int(adapter.tokenizer.convert_tokens_to_ids(token))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_layout_follows_the_processors_rule_and_its_markers(adapter, padding_side):
    """Each image's token grid is the processor's resize rule (`get_resize_output_image_size`, then whole 16-px
    merged blocks) and, independently, what the prompt shows: one ``[IMG_BREAK]`` per row but the last, which
    ``[IMG_END]`` closes, and a run of ``[IMG]`` per row. Every ``[IMG]`` gets the (row, col) of its place in
    those runs; the markers are SPECIAL and carry no token coordinates."""
    p, m = adapter.patch_size, adapter.merge_size
    samples = [Sample([noise(*SIZES[0], seed=0)], question="what is it?", id="a"),
               Sample([noise(h, w, seed=k) for k, (h, w) in enumerate(SIZES[1:4])], question="count", id="b"),
               Sample([noise(h, w, seed=k) for k, (h, w) in enumerate(SIZES[4:])], question="which colour?", answer="red", id="c")]
    batch = adapter.encode(samples, padding_side=padding_side)
    edge = adapter.processor.image_processor.size["longest_edge"]
    want = []
    for h, w in SIZES:
        rh, rw = get_resize_output_image_size(np.zeros((h, w, 3)), size=(edge, edge), patch_size=(p * m, p * m))
        want.append((rh // (p * m), rw // (p * m)))
    assert adapter.image_grids(batch.inputs) == want
    assert len(set(want)) == len(want)  # every image its own grid
    img, brk, end = adapter.image_token_id, _ids(adapter, "[IMG_BREAK]"), _ids(adapter, "[IMG_END]")
    roles, grids = batch.roles, iter(want)
    for b, s in enumerate(samples):
        ids = batch.input_ids[b].tolist()
        i, image = 0, 0
        while i < len(ids):
            if ids[i] != img:
                i += 1
                continue
            rows, r, c = [], 0, 0
            while ids[i] in (img, brk):  # walk the span: [IMG] runs separated by [IMG_BREAK], closed by [IMG_END]
                if ids[i] == brk:
                    rows.append(c)
                    r, c = r + 1, 0
                else:
                    assert (int(roles.image[b, i]), int(roles.row[b, i]), int(roles.col[b, i])) == (image, r, c)
                    assert roles.kind[b, i] == Role.VISUAL
                    c += 1
                i += 1
            assert ids[i] == end
            rows.append(c)
            assert (len(rows), rows[0]) == next(grids) and len(set(rows)) == 1
            image, i = image + 1, i + 1
        assert image == len(s.images)
    markers = torch.isin(batch.input_ids, torch.tensor([brk, end]))
    assert (roles.kind[markers] == Role.SPECIAL).all() and (roles.row[markers] == -1).all()
    assert int(markers.sum()) == sum(r for r, _ in want)  # one marker per token row
    # the text the role map aligns through is the processor's own replacement
    for k in range(len(SIZES)):
        n = want[k][0] * want[k][1]
        assert adapter.placeholder_text(batch.inputs, k, n) == adapter.processor.replace_image_token(batch.inputs, k)


def test_break_and_end_tokens_are_not_filled(adapter):
    """What the language model receives: ``[IMG]`` positions hold the image features (the model's own
    `get_image_features`, in sequence order), ``[IMG_BREAK]`` / ``[IMG_END]`` their own token embeddings."""
    batch = adapter.encode([Sample([noise(40, 70, seed=1), shapes(48, seed=2)], question="what is it?", id="a")])
    embeds = collect(adapter, batch, ["llm.embed"])[Site("llm.embed")][0]
    ids = batch.input_ids[0]
    with torch.no_grad():
        feats = torch.cat(adapter.model.model.get_image_features(batch.inputs["pixel_values"], batch.inputs["image_sizes"]).pooler_output)
        table = adapter.model.get_input_embeddings()(ids)
    visual = batch.roles.visual[0]
    torch.testing.assert_close(embeds[visual], feats, atol=1e-6, rtol=0)
    markers = torch.isin(ids, torch.tensor([_ids(adapter, "[IMG_BREAK]"), _ids(adapter, "[IMG_END]")]))
    assert int(markers.sum()) == 3 + 3  # a 3 x 4 and a 3 x 3 grid
    torch.testing.assert_close(embeds[markers], table[markers], atol=0, rtol=0)


def test_patch_rows_follow_the_image(adapter):
    """Perturb one patch of the *image* (the second of two; 32 x 48 px, which the processor keeps as it is): exactly
    one row of ``vision.embed`` changes, the patch's row-major place after the first image's 4 x 4 patches, and it
    is one of the patches of the token the role map puts at (row // 2, col // 2)."""
    p = adapter.patch_size
    base = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)
    first = shapes(32, seed=0)
    enc = lambda a: adapter.encode([Sample([first, Image.fromarray(a)], question="what is it?", id="s")])  # noqa: E731
    ref = enc(base)
    assert ref.inputs["image_sizes"].tolist() == [[32, 32], [32, 48]]
    vt = ref.roles.visual_tokens()
    emb0 = collect(adapter, ref, ["vision.embed"])[Site("vision.embed")]
    for pr, pc in ((0, 0), (1, 2), (3, 5), (2, 3)):
        img = base.copy()
        img[pr * p : (pr + 1) * p, pc * p : (pc + 1) * p] = 255 - img[pr * p : (pr + 1) * p, pc * p : (pc + 1) * p]
        batch = enc(img)
        changed = (batch.inputs["pixel_values"] - ref.inputs["pixel_values"]).abs().amax(1).nonzero().tolist()
        assert {(i, y // p, x // p) for i, y, x in changed} == {(1, pr, pc)}  # the processor kept the patch in place
        emb = collect(adapter, batch, ["vision.embed"])[Site("vision.embed")]
        rows = (emb - emb0).abs().amax(-1).nonzero().tolist()
        assert rows == [[0, 16 + pr * 6 + pc]], (pr, pc, rows)
        token = ((vt["image"] == 1) & (vt["row"] == pr // 2) & (vt["col"] == pc // 2)).nonzero().flatten()
        assert len(token) == 1
        assert 16 + pr * 6 + pc in adapter.patch_indices(vt["feature_col"][token], ref.inputs)[0].tolist()


def test_display_pixels_cut_the_padding(adapter):
    img = (np.random.default_rng(1).random((32, 48, 3)) * 255).astype(np.uint8)
    batch = adapter.encode([Sample([shapes(64, seed=0), Image.fromarray(img)], question="what is it?", id="s")])
    from embedlens.probes._util import display_pixels

    shown = display_pixels(adapter, batch.inputs, feature_row=0, image=1)  # [H, W, 3] in 0..1
    torch.testing.assert_close(shown, torch.tensor(img / 255.0, dtype=torch.float32), atol=2e-2, rtol=0)


def test_merger_blocks_on_odd_grids_as_the_tester_feeds_them():
    """HF's tester feeds 30-px images of 6-px patches: a 5 x 5 grid the merger's ``unfold`` floors to 2 x 2 tokens
    (no processor gives that; it rounds to whole blocks). Raising one patch row of the projector input changes
    exactly the token whose block `patch_indices` says holds it, and nothing for the patches the merger drops."""
    adapter = wrap_model(*BLOCK_TESTER_CONFIGS["mistral3"].build(0))
    sizes = torch.tensor([[30, 30], [24, 42]])  # 5 x 5 and 4 x 7 patches: 2 x 2 and 2 x 3 tokens
    inputs = {"image_sizes": sizes}
    assert adapter.image_grids(inputs) == [(2, 2), (2, 3)]
    layouts = adapter.image_layouts(inputs)
    n_tokens = sum(len(lay) for lay in layouts)
    proj = resolve_path(adapter.model, adapter.paths.projector)
    feats = torch.randn(25 + 28, proj.norm.weight.shape[0])
    with torch.no_grad():
        base = proj(feats, sizes)
    assert base.shape[0] == n_tokens == 10
    blocks = adapter.patch_indices(torch.arange(n_tokens), inputs)
    owner = {int(r): t for t, block in enumerate(blocks.tolist()) for r in block}
    assert len(owner) == 4 * n_tokens
    for row in range(feats.shape[0]):
        bumped = feats.clone()
        bumped[row] += 1.0
        with torch.no_grad():
            changed = (proj(bumped, sizes) - base).abs().amax(-1).nonzero().flatten().tolist()
        assert changed == ([owner[row]] if row in owner else []), (row, changed)


def test_sliding_window_bites(adapter):
    """Every layer of the tiny Mistral slides a window of 8 (shorter than the prompts): the engine's windows follow
    the config, and a full-attention engine would not be the model (test_equivalences checks the windowed engine
    against HF, hand-cut and masked)."""
    eng = Engine(adapter)
    assert eng.windows == [8] * adapter.n_llm_layers and set(eng.layer_types) == {"sliding_attention"}
    batch = adapter.encode([Sample([noise(40, 70, seed=1)], question="what is it?", id="a"),
                            Sample([shapes(64, seed=2)], question="count", id="b")], padding_side="right")
    valid = ~batch.roles.padding
    assert int(valid.sum(dim=1).min()) > 8
    sliding = eng.run(batch).logits()[valid]
    with torch.no_grad():
        ref = adapter.model(**adapter.model_inputs(batch)).logits[valid]
    torch.testing.assert_close(sliding, ref, atol=1e-5, rtol=0)
    eng.windows = [None] * adapter.n_llm_layers
    assert (eng.run(batch).logits()[valid] - sliding).abs().max() > 1e-3

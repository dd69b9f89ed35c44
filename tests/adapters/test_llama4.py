"""Llama 4: the tiling against HF's own processing code, the image span against the processor's own rule, each visual
token filled with the row HF scattered, engine logits and pruning against HF with chunks shorter than the prompts.

The family-wide proofs (sites, role map with left/right padding and several images, one pixel patch -> one patch ->
exactly the token of its pixel-shuffled block, planted codes, conformance, intervention equivalences, examples) run on
``tiny:llama4`` through the parametrised suites, and on HF's tester values in ``tests/adapters/test_hf_configs.py``
(``BLOCK_TESTER_CONFIGS["llama4"]``, ``["llama4-chunk"]``).
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import PILImageResampling, SizeDict

from conftest import get_adapter, hf_run
from embedlens.adapters import wrap_model
from embedlens.adapters.base import resolve_path
from embedlens.adapters.llama4_tiles import Llama4ImageProcessorPil, best_canvas, resized_size, supported_canvases
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.interventions.prune import Prune
from embedlens.roles import Role
from embedlens.sites import Site
from embedlens.testing.images import noise, shapes
from embedlens.tracing import collect
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS

TOL = 1e-4  # the bound for engine logits against HF's
_CACHE: dict[str, object] = {}


def _get(name: str):
    if name == "tiny":
        return get_adapter("llama4")
    if name not in _CACHE:
        _CACHE[name] = wrap_model(*BLOCK_TESTER_CONFIGS[name].build(0))
    return _CACHE[name]


def _two(big: int = 40):
    return [Sample([noise(big, big + 30, seed=1), shapes(24, seed=2)], question="what is in the picture?", id="a"),
            Sample([noise(20, 45, seed=3)], question="count", id="b")]


# -- HF's own image processing code, run here ---------------------------------------------------------------------
def _pil_resize(images: torch.Tensor, size, interpolation=None, antialias=True) -> torch.Tensor:
    """`[n, 3, H, W]` uint8 -> resized with PIL's bilinear filter (the primitive both sides share)."""
    h, w = size
    out = [np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)) for im in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def _tv_pad(images, padding, fill):
    assert list(fill) == [0, 0, 0] and padding[:2] == [0, 0]
    return torch.nn.functional.pad(images, (0, padding[2], 0, padding[3]), value=0)


def _tv_normalize(tensor, mean, std, inplace=False):
    # torchvision's: mean and std in the tensor's dtype, subtract then divide
    m = torch.as_tensor(mean, dtype=tensor.dtype)[:, None, None]
    s = torch.as_tensor(std, dtype=tensor.dtype)[:, None, None]
    return (tensor - m) / s


@pytest.fixture(scope="module")
def hf_llama4():
    """transformers' `image_processing_llama4` module, imported with a stand-in for torchvision's functional module
    (its only torchvision import): ``pad`` and ``normalize`` as torchvision's, for HF's own tiling code to run."""
    tv = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                                                    "torchvision.transforms.v2.functional")}
    tv["torchvision.transforms.v2.functional"].pad = _tv_pad
    tv["torchvision.transforms.v2.functional"].normalize = _tv_normalize
    name = "transformers.models.llama4.image_processing_llama4"
    saved = {k: sys.modules.get(k) for k in (*tv, name)}
    sys.modules.update(tv)
    sys.modules.pop(name, None)
    try:
        module = importlib.import_module(name)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


SIZES = [(h, w) for h in (1, 5, 8, 12, 16, 23, 40, 100) for w in (3, 8, 16, 20, 33, 64, 250)]


@pytest.mark.parametrize("max_tiles,to_max", [(4, False), (16, False), (16, True), (1, False)])
def test_canvas_and_resize_rules_equal_hfs_functions(hf_llama4, max_tiles, to_max):
    canvases = supported_canvases(max_tiles, 8)
    theirs = hf_llama4.find_supported_resolutions(max_tiles, SizeDict(height=8, width=8))
    assert canvases == theirs
    for h, w in SIZES:
        canvas = best_canvas((h, w), canvases, to_max)
        assert canvas == tuple(hf_llama4.get_best_fit((h, w), torch.tensor(theirs), resize_to_max_canvas=to_max).tolist())
        limit = canvas if to_max else (min(max(h, 8), canvas[0]), min(max(w, 8), canvas[1]))
        want = tuple(max(v, 1) for v in hf_llama4.get_max_res_without_distortion((h, w), limit))
        assert resized_size((h, w), canvas, 8, to_max) == want, (h, w)


def _hf_pixels(hf_llama4, images, max_tiles):
    """HF's `Llama4ImageProcessor._preprocess` itself, on an object whose resize is PIL's and whose normalize is
    torchvision's: its canvas choice, padding, bfloat16 normalisation, tiling and global tile."""
    hf = types.SimpleNamespace(resize=lambda img, size, resample=None: _pil_resize(img, (size.height, size.width)),
                               normalize=_tv_normalize)
    hf.rescale_and_normalize = types.MethodType(hf_llama4.Llama4ImageProcessor.rescale_and_normalize, hf)
    hf_llama4.find_supported_resolutions.cache_clear()
    tensors = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous() for im in images]
    return hf_llama4.Llama4ImageProcessor._preprocess(
        hf, tensors, do_resize=True, size=SizeDict(height=8, width=8), resample=PILImageResampling.BILINEAR, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, max_patches=max_tiles,
        resize_to_max_canvas=False, disable_grouping=True, return_tensors="pt")


@pytest.mark.parametrize("max_tiles", [4, 16])
def test_pixels_equal_hfs_preprocess(hf_llama4, max_tiles):
    """Pixel for pixel (HF's values are bfloat16's) and tile for tile, HF's own processing code given the same
    resize primitive; and the aspect ratios it reports."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in ((12, 16), (5, 30), (40, 40), (8, 8), (33, 9))]
    ours = Llama4ImageProcessorPil(size={"height": 8, "width": 8}, max_patches=max_tiles)(images, return_tensors="pt")
    theirs = _hf_pixels(hf_llama4, images, max_tiles)
    assert torch.equal(ours["aspect_ratios"], theirs["aspect_ratios"])
    assert ours["pixel_values"].dtype == torch.float32 and theirs["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"].float())
    n = [r * c + (r * c > 1) for r, c in ours["aspect_ratios"].tolist()]
    assert len(ours["pixel_values"]) == sum(n) and max(n) > 2


def test_tiles_by_hand():
    """A 12 x 16 image with 8-px tiles, up to 4: the 16 x 16 canvas (scale 1, no resize), the image in its top 12 rows
    and -1 (black, normalised) below, cut into 2 x 2 tiles row-major; then the whole image resized to 8 x 8."""
    arr = (np.random.default_rng(1).random((12, 16, 3)) * 255).astype(np.uint8)
    ip = Llama4ImageProcessorPil(size={"height": 8, "width": 8}, max_patches=4)
    out = ip([Image.fromarray(arr)], return_tensors="pt")
    assert out["aspect_ratios"].tolist() == [[2, 2]] and ip.get_number_of_image_patches(12, 16) == 5
    x = torch.from_numpy(arr).permute(2, 0, 1).to(torch.bfloat16) * (1 / 255)  # bfloat16 steps as HF's
    x = ((x - 0.5) / 0.5).float()
    pv = out["pixel_values"]
    assert torch.equal(pv[0], x[:, :8, :8]) and torch.equal(pv[1], x[:, :8, 8:])
    assert torch.equal(pv[2][:, :4], x[:, 8:, :8]) and torch.equal(pv[3][:, :4], x[:, 8:, 8:])
    assert (pv[2:4, :, 4:] == -1).all()
    small = np.array(Image.fromarray(arr).resize((8, 8), Image.BILINEAR))
    assert torch.equal(pv[4], ((torch.from_numpy(small).permute(2, 0, 1).to(torch.bfloat16) * (1 / 255) - 0.5) / 0.5).float())
    # one tile: no global tile; an image larger than every canvas goes to the one it shrinks least for: 100 x 30 to
    # 32 x 8 (scale 8 / 30), not 24 x 8 (24 / 100) or 16 x 16 (16 / 100)
    assert ip.get_number_of_image_patches(8, 8) == 1 and ip.get_number_of_image_patches(100, 30) == 4 + 1


# -- the image span ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_layout_follows_the_processors_rule_and_its_markers(padding_side):
    """Each image's tiles are the image processor's (its ``aspect_ratios``, which the processor drops: the adapter
    reads them back from the markers); the text each image becomes is `Llama4Processor._prompt_split_image`'s; the
    markers are SPECIAL, and the tokens run crop by crop, row-major, then the global tile (tile 0)."""
    a = _get("tiny")
    samples = _two()
    batch = a.encode(samples, padding_side=padding_side)
    ratios = a.processor.image_processor([im for s in samples for im in s.images], return_tensors="pt")["aspect_ratios"]
    assert torch.equal(a.tile_grids(batch.inputs), ratios) and sorted(map(tuple, ratios.tolist())) == [(1, 1), (1, 2), (2, 2)]
    gh, gw = a.grid()
    for i, (rows, cols) in enumerate(ratios.tolist()):
        n = rows * cols + (rows * cols > 1)
        assert a.placeholder_text(batch.inputs, i, n * gh * gw) == a.processor._prompt_split_image((rows, cols), gh * gw)
    roles, image = batch.roles, 0
    for b, s in enumerate(samples):
        for i in range(len(s.images)):
            rows, cols = ratios[image].tolist()
            sel = (roles.image[b] == i) & roles.visual[b]
            order = [0] if rows * cols == 1 else [*range(1, rows * cols + 1), 0]
            want = [(t, r, c) for t in order for r in range(gh) for c in range(gw)]
            got = list(zip(roles.tile[b][sel].tolist(), roles.row[b][sel].tolist(), roles.col[b][sel].tolist()))
            assert got == want
            image += 1
    names = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|tile_x_separator|>", "<|tile_y_separator|>")
    markers = torch.isin(batch.input_ids, torch.tensor(a.tokenizer.convert_tokens_to_ids(list(names))))
    # each image: start, <|image|>, end; with several tiles, a separator between the tiles of a row and after each row
    n_markers = sum(3 + (r * c > 1) * r * c for r, c in ratios.tolist())
    assert (roles.kind[markers] == Role.SPECIAL).all() and int(markers.sum()) == n_markers
    assert torch.equal(roles.visual, batch.input_ids == a.config.image_token_id)


def test_a_patch_of_one_crop_reaches_its_tile_and_the_token_the_map_names():
    """A 64 x 64 image (tiny: 32-px tiles of 4-px patches, 2 x 2 crops, no resize): inverting the pixels of patch
    (pr, pc) of crop (tr, tc) changes, among the crop tiles' rows of ``vision.embed`` (before attention mixes them),
    exactly one: patch pr * 8 + pc of the tile row the role map gives tile 1 + 2 * tr + tc; the token the map puts at
    (pr // 2, pc // 2) of that tile stands for that patch. The global tile (the whole image, resized) changes too."""
    a = _get("tiny")
    base = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    enc = lambda arr: a.encode([Sample([Image.fromarray(arr)], question="what is it?", id="s")])  # noqa: E731
    ref = enc(base)
    roles, vt = ref.roles, ref.roles.visual_tokens()
    assert a.tile_grids(ref.inputs).tolist() == [[2, 2]]
    emb0 = collect(a, ref, ["vision.embed"])[Site("vision.embed")]
    global_row = int(roles.feature_row[0][roles.visual[0] & (roles.tile[0] == 0)].unique())
    for tr, tc, pr, pc in ((0, 0, 0, 0), (0, 1, 3, 5), (1, 0, 7, 2), (1, 1, 6, 7)):
        arr = base.copy()
        y, x = 32 * tr + 4 * pr, 32 * tc + 4 * pc
        arr[y : y + 4, x : x + 4] = 255 - arr[y : y + 4, x : x + 4]
        changed = ((collect(a, enc(arr), ["vision.embed"])[Site("vision.embed")] - emb0).abs().amax(-1) > 0).nonzero().tolist()
        token = ((vt["tile"] == 1 + 2 * tr + tc) & (vt["row"] == pr // 2) & (vt["col"] == pc // 2)).nonzero().flatten()
        fr = int(vt["feature_row"][token])
        assert [rc for rc in changed if rc[0] != global_row] == [[fr, 8 * pr + pc]], (tr, tc, pr, pc, changed)
        assert any(rc[0] == global_row for rc in changed)
        assert 8 * pr + pc in a.patch_indices(vt["feature_col"][token], ref.inputs)[0].tolist()


@pytest.mark.parametrize("name", ["tiny", "llama4", "llama4-chunk"])
def test_each_visual_token_holds_the_row_hf_scattered(name):
    """`llm.embed` at the ``<|patch|>`` tokens is, in sequence order, the model's own `get_image_features` output,
    and the row the role map names (``projector[feature_row, feature_col]``); every other position the embedding
    of its token."""
    a = _get(name)
    batch = a.encode(_two(), padding_side="left")
    acts = collect(a, batch, ["llm.embed", "projector"])
    embeds = acts[Site("llm.embed")]
    with torch.no_grad():
        feats = a.model.get_image_features(a.model_inputs(batch)["pixel_values"]).pooler_output
        table = a.model.get_input_embeddings()(batch.input_ids)
    visual = batch.roles.visual
    torch.testing.assert_close(embeds[visual], feats.reshape(-1, feats.shape[-1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(embeds[visual], acts[Site("projector")][batch.roles.feature_row[visual], batch.roles.feature_col[visual]],
                               atol=0, rtol=0)
    torch.testing.assert_close(embeds[~visual], table[~visual], atol=0, rtol=0)


def test_the_class_token_is_the_towers_last_row_and_left_out():
    """HF's tower states are ``[tiles, patches + 1, d]`` with the class row last (its embedding is the class
    embedding plus the last position's); the vision sites are the rows before it."""
    a = _get("tiny")
    batch = a.encode(_two()[1:])
    acts = collect(a, batch, ["vision.embed", "vision.layers[0]"])
    tower = a.model.vision_model
    with torch.no_grad():
        hs = tower(a.model_inputs(batch)["pixel_values"], output_hidden_states=True).hidden_states
        cls = tower.layernorm_pre(tower.class_embedding + tower.positional_embedding_vlm[-1])
    n = (a.config.vision_config.image_size // a.config.vision_config.patch_size) ** 2
    assert hs[0].shape[1] == n + 1 and acts[Site("vision.embed")].shape[1] == n
    torch.testing.assert_close(hs[0][:, -1], cls.expand_as(hs[0][:, -1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(acts[Site("vision.embed")], hs[0][:, :-1], atol=0, rtol=0)
    torch.testing.assert_close(acts[Site("vision.layers", 0)], hs[1][:, :-1], atol=0, rtol=0)


# -- the engine ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", ["tiny", "llama4", "llama4-chunk"])
def test_engine_baseline_equals_hf_at_batch_two(name, padding_side):
    """Engine logits == the model's own at every real position (batch 2, both paddings); on tiny and llama4-chunk
    every prompt spans several chunks of 8 (HF counts them from each sample's first token)."""
    a = _get(name)
    batch = a.encode(_two(), padding_side=padding_side)
    eng = Engine(a)
    valid = ~batch.roles.padding
    chunks = [w.size for w in eng.windows if w is not None]
    if name != "llama4":
        assert chunks and max(chunks) * 3 < int(valid.sum(1).min())
    with torch.no_grad():
        ref = a.model(**a.model_inputs(batch), position_ids=a.position_ids(batch.inputs)).logits
    torch.testing.assert_close(eng.run(batch).logits()[valid], ref[valid], atol=TOL, rtol=0)


def test_nope_query_temperature_counts_each_samples_own_tokens():
    """The NoPE layer scales its queries by sequence index once ``floor_scale`` tokens pass (8192 in the released
    models; lowered to 4 here so that it bites): the engine equals HF's run of each sample alone, with either padding.
    HF's own left-padded batch counts the padding in that index (``arange`` over the padded row), so it differs
    from the samples run alone, and from the engine."""
    a = _get("tiny")
    nope = resolve_path(a.model, a.paths.llm_layers)[3].self_attn
    assert not nope.use_rope and nope.attn_temperature_tuning
    nope.floor_scale = 4
    try:
        for side in ("left", "right"):
            batch = a.encode(_two(), padding_side=side)
            got = Engine(a).run(batch).logits()
            for b in range(2):
                valid = ~batch.roles.padding[b]
                torch.testing.assert_close(got[b][valid], hf_run(a, batch, b, valid).logits[0], atol=TOL, rtol=0)
        left = a.encode(_two(), padding_side="left")
        valid = ~left.roles.padding
        with torch.no_grad():
            padded = a.model(**a.model_inputs(left), position_ids=a.position_ids(left.inputs)).logits
        assert (padded[valid] - Engine(a).run(left).logits()[valid]).abs().max() > 1e-4
    finally:
        nope.floor_scale = 8192


@pytest.mark.parametrize("name", ["tiny", "llama4-chunk"])
def test_prune_equals_hf_on_the_shortened_sequence(name):
    """Pruning a different number of visual tokens per sample (batch 2, left padding) == HF run on each sample's
    kept rows at their original position ids (its chunks counted over the kept rows)."""
    a = _get(name)
    batch = a.encode(_two(), padding_side="left")
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


def test_tiny_source_keeps_the_vision_rotary_complex():
    """Casting a tiny model (``dtype``) keeps Llama 4's complex rotary frequencies complex and equal to the model's
    own (``Module.to`` alone would cast them to the real dtype, dropping their imaginary part)."""
    from embedlens.adapters import load_model
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding

    a = load_model("tiny:llama4", dtype="bfloat16")
    freqs = a.model.vision_model.rotary_embedding.freqs_ci
    assert a.model.dtype == torch.bfloat16 and freqs.is_complex()
    assert torch.equal(freqs, Llama4VisionRotaryEmbedding._compute_freqs_ci(a.config.vision_config))
    batch = a.encode(_two()[1:])
    assert a.model_inputs(batch)["pixel_values"].dtype == torch.bfloat16  # the model does not cast them itself
    assert torch.isfinite(collect(a, batch, ["projector"])[Site("projector")].float()).all()

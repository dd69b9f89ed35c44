"""Every supported family on the configurations Hugging Face's own test suite uses.

Table-driven: one entry of `tests.support.hf_testers.TESTER_CONFIGS` per
tester configuration variant; every test runs on every entry. A new family
is covered by adding its tester's values there. References are computed
without embedlens: the model's own forward (``output_hidden_states``, torch
hooks on its modules), and for the patch of each token, coordinate codes
planted in the projector output and carried into the sequence by the model's
own merging code (unpadding, newlines, anyres_max downsampling included).
"""

from __future__ import annotations

import dataclasses
import functools
import types

import pytest
import torch
from einops import rearrange
from transformers import LlavaOnevisionConfig
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from embedlens.adapters.capabilities import Capability
from embedlens.adapters import wrap_model
from embedlens.adapters.llava_onevision import anyres_layouts
from embedlens.data import Sample
from embedlens.probes._util import visual_rows
from embedlens.roles import Role
from embedlens.sites import Site
from embedlens.testing.images import noise
from embedlens.tracing import collect
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS, TESTER_CONFIGS, paligemma_builder

TOL = dict(atol=1e-5, rtol=1e-5)
NAMES = list(TESTER_CONFIGS)
_CACHE: dict[str, object] = {}


def _adapter(name: str):
    if name not in _CACHE:
        _CACHE[name] = wrap_model(*TESTER_CONFIGS[name].build(0))
    return _CACHE[name]


def _batch(name: str, padding_side: str = "left"):
    """The entry's images (its sizes, several per prompt where it says so), with questions and answers."""
    tc, adapter = TESTER_CONFIGS[name], _adapter(name)
    samples = [
        Sample([noise(h, w, seed=10 * i + k) for k in range(tc.images_per_sample)],
               question="what is in the picture?", answer="a red circle", id=f"s{i}")
        for i, (h, w) in enumerate(tc.image_sizes)
    ]
    samples.append(Sample([noise(24, 24, seed=99) for _ in range(tc.images_per_sample)], question="count", answer="two", id="short"))
    return adapter, adapter.encode(samples, padding_side=padding_side)


def _hf_forward(adapter, batch):
    """The model's own forward, with the tower's input and the projector's input and output captured by hooks."""
    m = adapter.model.model
    seen: dict[str, torch.Tensor] = {}
    def tower_input(module, args, kwargs):
        seen["pixels"] = kwargs.get("pixel_values", args[0] if args else None)

    def projector(module, args, output):
        seen.update(features=args[0], projected=output)

    hooks = [m.vision_tower.register_forward_pre_hook(tower_input, with_kwargs=True),
             m.multi_modal_projector.register_forward_hook(projector)]
    try:
        with torch.no_grad():
            out = adapter.model(**adapter.model_inputs(batch), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        tower = m.vision_tower(seen["pixels"], output_hidden_states=True)
    return out, tower, seen


def _n_cls(adapter) -> int:
    """CLS tokens of the tower, from its config alone (CLIP has one, SigLIP none)."""
    return 1 if adapter.config.vision_config.model_type == "clip_vision_model" else 0


def test_the_table_covers_the_testers_variants():
    """Every supported family, and each variant HF's tests switch on, has an entry (read off the built models)."""
    from embedlens.registry import adapters

    built = {n: _adapter(n) for n in NAMES}
    cfgs = {n: a.config for n, a in built.items()}
    families = {TESTER_CONFIGS[n].family for n in NAMES} | {c.family for c in BLOCK_TESTER_CONFIGS.values()}
    assert families == {name for name, _ in adapters.items()}
    assert any(isinstance(c.vision_feature_layer, list) for c in cfgs.values())
    assert {c.vision_feature_select_strategy for c in cfgs.values()} >= {"full", "default"}
    assert any(a.model.lm_head.weight is a.model.get_input_embeddings().weight for a in built.values() if a.name == "llava")
    assert any(getattr(c, "image_seq_length", None) not in (None, built[n].grid()[0] * built[n].grid()[1])
               for n, c in cfgs.items())
    assert any(TESTER_CONFIGS[n].images_per_sample > 1 for n in NAMES)
    ov = [n for n in NAMES if TESTER_CONFIGS[n].family == "llava_onevision"]
    assert {TESTER_CONFIGS[n].downsamples for n in ov} == {True, False}
    assert any(c.text_config.model_type == "gemma2" for c in cfgs.values())


# -- sites ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_llm_sites_equal_hf(name):
    adapter, batch = _batch(name)
    n = adapter.n_llm_layers
    sites = ["llm.norm", "llm.unembed"] + [f"llm.layers[{i}].in" for i in range(n)] + [f"llm.layers[{i}]" for i in range(n)]
    acts = collect(adapter, batch, sites)
    out, _, _ = _hf_forward(adapter, batch)
    hs = out.hidden_states  # hs[i] enters decoder layer i; hs[n] is after the final norm
    for i in range(n):
        torch.testing.assert_close(acts[Site("llm.layers", i, "in")], hs[i], **TOL)
    for i in range(n - 1):
        torch.testing.assert_close(acts[Site("llm.layers", i)], hs[i + 1], **TOL)
    torch.testing.assert_close(acts[Site("llm.norm")], hs[n], **TOL)
    torch.testing.assert_close(acts[Site("llm.unembed")], out.logits, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_vision_sites_equal_hf(name):
    adapter, batch = _batch(name)
    n = adapter.n_vision_layers
    acts = collect(adapter, batch, [f"vision.layers[{i}]" for i in range(n)] + ["vision.features", "projector"])
    _, tower, seen = _hf_forward(adapter, batch)
    for i in range(n):
        torch.testing.assert_close(acts[Site("vision.layers", i)], tower.hidden_states[i + 1], **TOL)
    torch.testing.assert_close(acts[Site("vision.features")], seen["features"], **TOL)
    torch.testing.assert_close(acts[Site("projector")], seen["projected"], **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_vision_rows_of_each_token_are_its_patch(name):
    """What probes read for a visual token at a vision site (`visual_rows`) is the tower's
    hidden state of the token's own patch: the tower's CLS tokens, then patches row-major."""
    adapter, batch = _batch(name)
    vt = batch.roles.visual_tokens()
    w = adapter.grid()[1]
    _, tower, seen = _hf_forward(adapter, batch)
    index = _n_cls(adapter) + vt["row"] * w + vt["col"]  # the token's patch in the tower's sequence
    layer = adapter.n_vision_layers - 1
    site = Site("vision.layers", layer)
    got = visual_rows(adapter, site, collect(adapter, batch, [site])[site], vt)
    torch.testing.assert_close(got, tower.hidden_states[layer + 1][vt["feature_row"], index], **TOL)
    # vision.features: what the projector receives; its rows may concatenate several tower layers
    got = visual_rows(adapter, Site("vision.features"), seen["features"], vt)
    if adapter.config.model_type == "paligemma":  # PaliGemmaModel projects the tower's last_hidden_state
        want = tower.last_hidden_state[vt["feature_row"], index]
    else:
        layers = adapter.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        want = torch.cat([tower.hidden_states[lay][vt["feature_row"], index] for lay in layers], dim=-1)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_sink_detector_reads_each_tokens_own_patch_norm(name):
    """The ViT high-norm test indexes the tower by the role map (where PaliGemma's ignored
    `vision_feature_select_strategy: default` once shifted it a patch, past the end of the grid)."""
    from embedlens.probes.sink_detector import SinkDetector

    adapter, batch = _batch(name)
    probe = SinkDetector(vit_layer=-1, tau=5.0)
    rows = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))["tokens"]
    vt = batch.roles.visual_tokens()
    _, tower, _ = _hf_forward(adapter, batch)
    index = _n_cls(adapter) + vt["row"] * adapter.grid()[1] + vt["col"]
    want = tower.hidden_states[-1][vt["feature_row"], index].norm(dim=-1)
    torch.testing.assert_close(torch.tensor(rows["vit_norm"]), want, atol=1e-4, rtol=1e-5)


# -- the role map ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_role_counts_match_the_model(name):
    adapter, batch = _batch(name)
    roles, ids = batch.roles, batch.input_ids
    _, tower, seen = _hf_forward(adapter, batch)
    n_images = sum(len(s.images) for s in batch.samples)
    # the image span is every placeholder, and as many rows as the model scatters into the sequence
    assert torch.equal(roles.image_span, ids == adapter.image_token_id)
    keys = ("pixel_values", "image_sizes", "batch_num_images")
    with torch.no_grad():
        feats = adapter.model.model.get_image_features(**{k: v for k, v in batch.inputs.items() if k in keys}).pooler_output
    n_feats = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0] * feats.shape[1]
    assert int(roles.image_span.sum()) == n_feats
    assert int((roles.visual | roles.image_newline | roles.image_cls).sum()) == n_feats
    # a CLS token is kept exactly when the projector receives one more token per tile than there are patches
    kept_cls = seen["features"].shape[1] - adapter.grid()[0] * adapter.grid()[1]
    assert kept_cls in (0, 1)
    assert int(roles.image_cls.sum()) == kept_cls * n_images
    if not adapter.has(Capability.IMAGE_NEWLINE):
        assert int(roles.visual.sum()) == n_images * adapter.grid()[0] * adapter.grid()[1]
        assert not roles.image_newline.any()
    for b, s in enumerate(batch.samples):
        assert roles.n_images(b) == len(s.images)


def _codes(adapter, batch, n_rows: int, tokens: int, n_cls_kept: int) -> torch.Tensor:
    """`[vision rows, tokens, 4]` planted codes: (1, global row + 1, global col + 1, tile + 1); a kept CLS
    token gets rows/cols 0. Anyres grid tiles get coordinates in their image's whole grid of tiles (cut from
    one canvas with einops), the base image its own patch coordinates."""
    h, w = adapter.grid()
    cfg = adapter.config
    if "image_sizes" not in batch.inputs:  # one tile per image
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        patch = torch.stack([torch.ones(h * w), r.flatten() + 1.0, c.flatten() + 1.0, torch.ones(h * w)], dim=-1)
        cls = torch.tensor([[1.0, 0.0, 0.0, 1.0]]).expand(n_cls_kept, 4)
        return torch.cat([cls, patch]).expand(n_rows, tokens, 4)
    sizes = batch.inputs["image_sizes"]
    per_sample = batch.inputs.get("batch_num_images")
    tiled = [True] * len(sizes) if per_sample is None else [int(n) == 1 for n in per_sample for _ in range(int(n))]
    rows = []
    for size, t in zip(sizes, tiled):
        n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if t else 1
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows.append(torch.stack([torch.ones(h, w), r + 1.0, c + 1.0, torch.ones(h, w)], dim=-1).reshape(1, h * w, 4))
        if n > 1:
            th, tw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            gr, gc = torch.meshgrid(torch.arange(th * h), torch.arange(tw * w), indexing="ij")
            tile = 2.0 + (gr // h) * tw + gc // w  # tile index + 1; 1 is the base image
            canvas = torch.stack([torch.ones_like(tile), gr + 1.0, gc + 1.0, tile], dim=-1)
            rows.append(rearrange(canvas, "(th h) (tw w) k -> (th tw) (h w) k", h=h, w=w))
    return torch.cat(rows)


@pytest.mark.parametrize("name", NAMES)
def test_each_token_shows_the_patch_the_map_names(name):
    """Plant each patch's coordinates in the projector output and let the model's own code place them
    (anyres unpadding, newlines and downsampling included): each visual position then holds its patch's
    coordinates, or for a downsampled token the sampling point's, whose nearest patch the map must name."""
    adapter, batch = _batch(name)
    roles = batch.roles
    proj = adapter.model.model.multi_modal_projector
    h, w = adapter.grid()

    def plant(module, args, output):
        n_rows, tokens = output.shape[:2]
        code = _codes(adapter, batch, n_rows, tokens, tokens - h * w)
        out = torch.zeros_like(output)
        out[..., :4] = code.to(output.dtype)
        return out

    handle = proj.register_forward_hook(plant)
    try:
        emb = collect(adapter, batch, ["llm.embed"])[Site("llm.embed")]
    finally:
        handle.remove()
    span = roles.image_span
    got = emb[span]
    newline = torch.zeros(len(got), dtype=torch.bool)
    if adapter.has(Capability.IMAGE_NEWLINE):  # the model's learned newline vector, not a planted code
        newline = torch.isclose(got, adapter.model.model.image_newline.detach().expand_as(got), atol=1e-6).all(-1)
    kind = roles.kind[span]
    assert torch.equal(newline, kind == Role.IMAGE_NEWLINE)
    code = got[~newline] / got[~newline][:, :1]  # channel 0 carries any scale the family applies (PaliGemma: 1/sqrt(d))
    kind = kind[~newline]
    cls = code[:, 1] < 0.5  # planted row 0: the CLS token
    assert torch.equal(cls, kind == Role.IMAGE_CLS)
    nearest = (code[:, 1:3] - 1.0 + 0.5).floor().long()  # global (row, col) of the nearest patch
    vis = ~cls
    gr, gc = nearest[vis, 0], nearest[vis, 1]
    tile_code = code[vis, 3]
    base = torch.isclose(tile_code, torch.ones_like(tile_code))  # the base image (or a one-tile image)
    want_row, want_col = gr % h, gc % w
    assert torch.equal(roles.row[span][~newline][vis], want_row)
    assert torch.equal(roles.col[span][~newline][vis], want_col)
    tiles = roles.tile[span][~newline][vis]
    assert (tiles[base] == 0).all()
    if "image_sizes" in batch.inputs:
        # a grid tile's index follows from the nearest patch's global position and the image's tile grid
        cfg = adapter.config
        img = roles.image[span][~newline][vis]
        sample = torch.arange(roles.kind.shape[0])[:, None].expand_as(roles.kind)[span][~newline][vis]
        flat = torch.tensor([sum(len(s.images) for s in batch.samples[:b]) for b in range(len(batch.samples))])[sample] + img
        sizes = batch.inputs["image_sizes"][flat]
        tw = torch.tensor([get_anyres_image_grid_shape(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)[1] for s in sizes])
        want_tile = 1 + (gr // h) * tw + gc // w
        assert torch.equal(tiles[~base], want_tile[~base])
    if not TESTER_CONFIGS[name].downsamples:
        # without interpolation every code arrives whole: the tile channel is exact too
        assert torch.equal(tiles + 1, tile_code.round().long())
    else:
        assert (~base).any() and not torch.isclose(code[vis, 1:3], code[vis, 1:3].round()).all()  # it did downsample


# -- OneVision anyres at the real geometry ----------------------------------------------------------------
def _old_layouts(config, image_sizes, n_tiles):
    """The interpolation of (tile, local row, local col) that item 1 of issue 16 replaced, kept to measure it."""
    pack = functools.partial(LlavaOnevisionModel.pack_image_features, types.SimpleNamespace(config=config))
    h = w = config.vision_config.image_size // config.vision_config.patch_size
    r, c = torch.meshgrid(torch.arange(h) + 1.0, torch.arange(w) + 1.0, indexing="ij")
    coords = [torch.stack([torch.full((n, h * w), 1.0) + torch.arange(n)[:, None], r.flatten().expand(n, -1),
                           c.flatten().expand(n, -1)], dim=-1) for n in n_tiles]
    packed, _ = pack(coords, image_sizes, image_newline=torch.zeros(3), vision_aspect_ratio=config.vision_aspect_ratio)
    return [f.round().long() - 1 for f in packed]  # (tile, row, col), newline -1


REAL_SIZES = [[899, 1024], [1500, 1500], [2000, 1200], [1200, 2300], [1152, 1536], [3000, 1000]]


def test_onevision_anyres_real_geometry_against_hf_packing():
    """llava-onevision-qwen2 geometry (384-px tiles, 27x27 patches, anyres_max_9, pinpoints up to 6x6
    tiles): HF's `pack_image_features` run on global-coordinate maps (cut from one canvas per image) names
    the nearest patch of each downsampled token; `anyres_layouts` must name the same tile and patch."""
    config = LlavaOnevisionConfig()
    v = config.vision_config
    assert (v.image_size, v.patch_size, config.vision_aspect_ratio) == (384, 14, "anyres_max_9")
    h = w = v.image_size // v.patch_size
    pack = functools.partial(LlavaOnevisionModel.pack_image_features, types.SimpleNamespace(config=config))
    sizes = torch.tensor(REAL_SIZES)
    n_tiles = [image_size_to_num_patches(s, config.image_grid_pinpoints, v.image_size) for s in sizes]
    assert all(n > 10 for n in n_tiles[1:])  # more than 3x3 tiles: downsampled
    layouts = anyres_layouts(pack, config, sizes, n_tiles)
    old = _old_layouts(config, sizes, n_tiles)
    wrong, first_row = [], 0
    for size, n, lay, before in zip(sizes, n_tiles, layouts, old):
        th, tw = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, v.image_size)
        gr, gc = torch.meshgrid(torch.arange(th * h), torch.arange(tw * w), indexing="ij")
        canvas = torch.stack([torch.ones_like(gr), gr + 1, gc + 1], dim=-1).float()
        base = torch.cat([torch.full((h * w, 1), -1.0), torch.zeros(h * w, 2)], dim=-1)  # marked, not a canvas patch
        tiles = torch.cat([base[None], rearrange(canvas, "(th h) (tw w) k -> (th tw) (h w) k", h=h, w=w)])
        assert tiles.shape[0] == n
        (packed,), _ = pack([tiles], size[None], image_newline=torch.zeros(3), vision_aspect_ratio=config.vision_aspect_ratio)
        assert len(packed) == len(lay)
        grid = packed[:, 0] > 0.5
        nearest = (packed[grid, 1:] - 1.0 + 0.5).floor().long()
        tile_map = 1 + (gr // h) * tw + gc // w  # [grid rows, grid cols] -> tile index
        want = torch.stack([tile_map[nearest[:, 0], nearest[:, 1]], (gr % h)[nearest[:, 0], nearest[:, 1]],
                            (gc % w)[nearest[:, 0], nearest[:, 1]]], dim=1)
        assert torch.equal(lay[grid, :3], want)
        assert torch.equal(lay[grid, 3], first_row + want[:, 0])  # one vision row per tile, images in order
        first_row += n
        assert torch.equal(lay[grid, 4], want[:, 1] * w + want[:, 2])
        # the base image comes first, whole; newlines end each grid row
        assert torch.equal(lay[: h * w, 0], torch.zeros(h * w, dtype=torch.long))
        assert (lay[packed[:, 0] == 0, 1] == -1).all() and (packed[:, 0] == 0).sum() > 0
        # the replaced interpolation of (tile, local row, local col): a token is wrong when the patch it
        # named is not a nearest one (more than half a patch from the sampling point; ties are not errors)
        t, r, c = before[grid].unbind(-1)
        named = torch.stack([(t - 1) // tw * h + r, (t - 1) % tw * w + c], dim=-1).float()
        dist = (named - (packed[grid, 1:] - 1.0)).abs().amax(-1)
        wrong.append((int((dist > 0.5 + 1e-4).sum()), int(grid.sum()), float(dist.max())))
    # measured on the previous code: 6-7% of the grid tokens of each downsampled image, up to ~100 patches off
    assert wrong[0][0] == 0 and all(bad > 0 for bad, _, _ in wrong[1:]), wrong
    print("old interpolation: (wrong, grid tokens, farthest in patches) per image:", wrong)


# -- final logit softcapping (Gemma2) ----------------------------------------------------------------------
def test_softcapped_logits_agree_everywhere():
    """`llm.unembed`, the logit lens at the last layer and the intervention engine give the model's own
    logits, final-logit softcapping included (lm_head scaled so that logits pass the cap)."""
    from embedlens.interventions import Engine
    from embedlens.probes.logit_lens import lens_logits

    adapter = wrap_model(*paligemma_builder("gemma2", full_attention_only=True)(0))
    assert adapter.final_logit_softcap == 30.0
    with torch.no_grad():
        adapter.model.lm_head.weight.mul_(400.0)
    batch = adapter.encode([Sample([noise(20, 20, seed=1)], question="what is it?", answer="red", id="a"),
                            Sample([noise(20, 20, seed=2)], question="count the shapes", answer="two", id="b")])
    with torch.no_grad():
        ref = adapter.model(**adapter.model_inputs(batch), output_hidden_states=True)
        raw = adapter.model.lm_head(ref.hidden_states[-1])
    valid = ~batch.roles.padding
    assert (raw[valid].abs() > 30).any() and (raw - ref.logits).abs().max() > 1.0  # the cap bites
    n = adapter.n_llm_layers
    acts = collect(adapter, batch, ["llm.unembed", f"llm.layers[{n - 1}]"])
    torch.testing.assert_close(acts[Site("llm.unembed")], ref.logits, **TOL)
    torch.testing.assert_close(lens_logits(adapter, acts[Site("llm.layers", n - 1)])[valid], ref.logits[valid], atol=1e-4, rtol=1e-5)
    engine_logits = Engine(adapter).run(batch).logits()
    torch.testing.assert_close(engine_logits[valid], ref.logits[valid], atol=1e-4, rtol=1e-5)


# -- PaliGemma 2: sliding-window layers in the intervention engine ------------------------------------------
@pytest.mark.parametrize("window", [None, 4])
def test_paligemma2_interventions_equal_hand_built_hf_runs(window):
    """PaliGemma 2's Gemma 2 alternates sliding and global layers; its sliding mask ORs the bidirectional prefix in
    after the window (HF's create_sliding_window_causal_mask with block ids), unlike Gemma 3. On the tester's
    window (4096) and on one of 4 rows, shorter than every prompt and than the image, the engine's baseline,
    pruning (removal == hand-cut run; mask == HF with a 2-D mask where the window bites), injection, knockout and
    generation after pruning equal HF."""
    from embedlens.interventions import Engine
    from tests.interventions import test_equivalences as eq

    adapter = wrap_model(*paligemma_builder("gemma2", sliding_window=window)(0))
    eng = Engine(adapter)
    assert eng.layer_types == ["sliding_attention", "full_attention"] and eng.windows[0] == (window or 4096)
    batch = adapter.encode([Sample([noise(20, 20, seed=i)], question=q, id=f"s{i}")
                            for i, q in enumerate(["what is it?", "what colour is the big square on the left?", "count"])],
                           padding_side="left")
    setup = (adapter, batch, eng)
    assert eq.window_bites(eng, batch) == (window is not None)
    from tests.adapters import test_sites

    test_sites.test_attn_and_mlp_updates_sum_to_the_layer_output(adapter)  # Gemma 2's post-norms are the updates
    for check in (eq.test_baseline_equals_hf, eq.test_prune_remove_mask_and_hand_cut_agree,
                  eq.test_generation_after_pruning_matches_hand_built, eq.test_inject_at_layer_1_equals_two_phase_run,
                  eq.test_knockout_of_image_from_text_equals_pruning_the_image):
        check(setup)
    if window is not None:  # the composition matters: the window also bounding the prefix is not PaliGemma 2's mask
        valid = ~batch.roles.padding
        with torch.no_grad():
            ref = adapter.model(**adapter.model_inputs(batch), position_ids=adapter.position_ids(batch.inputs)).logits
        adapter.capabilities = adapter.capabilities | {Capability.WINDOWED_BLOCKS}  # this instance only
        try:
            assert (eng.run(batch).logits()[valid] - ref[valid]).abs().max() > 1e-4
        finally:
            del adapter.capabilities


# -- families whose tokens are blocks of patches ------------------------------------------------------------
# The tests above assume one patch per token and LLaVA's module names; every `BLOCK_TESTER_CONFIGS` entry runs the
# block-aware shared proofs instead: a new entry is covered by adding it there. The Qwen-VL entries (packed towers
# in window order, M-RoPE) run the packed variants of the same proofs in tests/adapters/test_qwen2_vl.py, and
# LLaVA-OneVision-1.5's (a packed tower with a class token per image) in tests/adapters/test_llava_onevision1_5.py,
# GLM-4V's (a packed tower that merges before its merger) in tests/adapters/test_glm4v.py, Molmo2's (tokens that pool
# patches of several crops, features added to the token embeddings) in tests/adapters/test_molmo2.py.
BLOCK_NAMES = [n for n, c in BLOCK_TESTER_CONFIGS.items()
               if not c.family.startswith(("qwen", "llava_onevision1_5", "glm4v", "molmo2"))]


def _block_adapter(name: str):
    if name not in _CACHE:
        adapter = wrap_model(*BLOCK_TESTER_CONFIGS[name].build(0))
        assert adapter.name == BLOCK_TESTER_CONFIGS[name].family
        _CACHE[name] = adapter
    return _CACHE[name]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_block_family_role_map(name, padding_side):
    from tests import test_roles

    adapter = _block_adapter(name)
    test_roles.test_visual_positions_hold_image_tokens(adapter, padding_side)
    test_roles.test_text_spans_decode_to_what_was_asked(adapter, padding_side)
    if padding_side == "left":
        test_roles.test_role_kinds_partition_every_position(adapter)


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_block_family_tokens_stand_for_their_patch_blocks(name):
    """One pixel patch changed -> one patch of the tower changes -> exactly the token whose block the map names;
    planted codes in the projector output arrive where the map says."""
    from tests import test_roles

    adapter = _block_adapter(name)
    assert adapter.patch_block != (1, 1) or adapter.has(Capability.PACKED_TOWER)  # Pixtral in LLaVA: one patch per token, packed
    test_roles.test_row_col_match_the_patch_embedding(adapter)
    test_roles.test_sequence_positions_receive_the_named_features(adapter)
    test_roles.test_newline_tokens_only_where_the_family_has_them(adapter)


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_block_family_sites(name):
    from tests.adapters import test_sites

    adapter = _block_adapter(name)
    test_sites.test_llm_sites_equal_hf_hidden_states(adapter, "left")
    test_sites.test_vision_sites_equal_hf_hidden_states(adapter)
    test_sites.test_attn_and_mlp_updates_sum_to_the_layer_output(adapter)


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_block_family_prune_equivalence(name):
    from embedlens.interventions import Engine
    from tests.interventions import test_equivalences

    adapter = _block_adapter(name)
    samples = test_equivalences.prompt_samples()
    rows, cols = adapter.grid()
    if rows * cols < 5:  # so few tokens per image (Gemma 3's tester: one) that the samples need more images to
        # prune a different number of tokens each
        samples = [dataclasses.replace(s, images=[noise(24, 24, seed=k) for k in range(5)]) for s in samples]
    batch = adapter.encode(samples, padding_side="right")
    test_equivalences.test_prune_remove_mask_and_hand_cut_agree((adapter, batch, Engine(adapter)))


# -- loading -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_saved_folder_loads_with_every_weight_in_place(name, tmp_path):
    """`load_model` refuses checkpoints whose weights do not fill the model; every tester configuration
    (tied embeddings included) saved with `save_pretrained` passes that check and gives the same logits."""
    from embedlens.adapters import load_model

    model, processor = TESTER_CONFIGS[name].build(3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    adapter = load_model(str(tmp_path))
    assert adapter.name == TESTER_CONFIGS[name].family
    batch = _batch(name)[1]
    with torch.no_grad():
        torch.testing.assert_close(adapter.model(**adapter.model_inputs(batch)).logits,
                                   model(**adapter.model_inputs(batch)).logits, **TOL)

"""Gemma 4: the image span against the processor's own rule and its markers, each visual token filled with the row
HF's own `get_image_features` gives, engine logits and pruning against HF (per-layer inputs, shared key/values,
experts, windows), image blocks on sliding layers only, and expert routing recomputed on the pruned sequence.

The family-wide proofs (sites, role map with left/right padding and several images, one pixel patch -> one patch ->
exactly the token of its pooled block, planted codes, conformance, intervention equivalences, examples) run on
``tiny:gemma4`` through the parametrised suites, and on HF's tester values in ``tests/adapters/test_hf_configs.py``
(``BLOCK_TESTER_CONFIGS["gemma4"]``, ``["gemma4-window"]``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.gemma4.processing_gemma4 import get_aspect_ratio_preserving_size

from conftest import get_adapter, hf_run
from embedlens.adapters import Capability, wrap_model
from embedlens.data import Sample
from embedlens.errors import AdapterError, InterventionError
from embedlens.interventions import Engine
from embedlens.interventions.prune import FastV, Prune
from embedlens.roles import Role
from embedlens.sites import Site
from embedlens.testing.images import noise, shapes
from embedlens.tracing import collect
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS

TOL = 1e-4  # the bound for engine logits against HF's
SIZES = ((64, 64), (40, 70), (70, 40), (20, 100), (17, 50))
_CACHE: dict[str, object] = {}


@pytest.fixture(scope="module")
def adapter():
    return get_adapter("gemma4")


def _get(name: str):
    if name == "tiny":
        return get_adapter("gemma4")
    if name not in _CACHE:
        _CACHE[name] = wrap_model(*BLOCK_TESTER_CONFIGS[name].build(0))
    return _CACHE[name]


def _two():
    return [Sample([noise(30, 30, seed=1), shapes(40, seed=2)], question="what is in the picture?", id="a"),
            Sample([noise(20, 45, seed=3)], question="count", id="b")]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_layout_follows_the_processors_rule_and_its_markers(adapter, padding_side):
    """Each image's token grid is the processor's resize rule (`get_aspect_ratio_preserving_size`) over k x k blocks of
    patches; in the prompt its tokens run between ``<|image>`` and ``<image|>`` (SPECIAL), row-major."""
    ip = adapter.processor.image_processor
    p, k = int(ip.patch_size), int(ip.pooling_kernel_size)
    samples = [Sample([noise(*SIZES[0], seed=0)], question="what is it?", id="a"),
               Sample([noise(h, w, seed=i) for i, (h, w) in enumerate(SIZES[1:])], question="count", id="b")]
    batch = adapter.encode(samples, padding_side=padding_side)
    want = []
    for h, w in SIZES:
        th, tw = get_aspect_ratio_preserving_size(h, w, patch_size=p, max_patches=int(ip.max_soft_tokens) * k * k,
                                                  pooling_kernel_size=k)
        want.append((th // (p * k), tw // (p * k)))
    assert adapter.image_grids(batch.inputs) == want
    assert len(set(want)) == len(want)
    boi, eoi = adapter.config.boi_token_id, adapter.config.eoi_token_id
    roles = batch.roles
    grids = iter(want)
    for b, s in enumerate(samples):
        ids = batch.input_ids[b].tolist()
        starts = [i for i, t in enumerate(ids) if t == boi]
        assert len(starts) == len(s.images)
        for image, start in enumerate(starts):
            rows, cols = next(grids)
            span = range(start + 1, start + 1 + rows * cols)
            assert ids[span.stop] == eoi and all(ids[i] == adapter.image_token_id for i in span)
            got = [(int(roles.image[b, i]), int(roles.row[b, i]), int(roles.col[b, i])) for i in span]
            assert got == [(image, r, c) for r in range(rows) for c in range(cols)]
    markers = torch.isin(batch.input_ids, torch.tensor([boi, eoi]))
    assert (roles.kind[markers] == Role.SPECIAL).all() and int(markers.sum()) == 2 * len(SIZES)
    for i, (rows, cols) in enumerate(want):  # the text the role map aligns through is the processor's own
        assert adapter.placeholder_text(batch.inputs, i, rows * cols) == adapter.processor.replace_image_token(
            {"num_soft_tokens_per_image": [r * c for r, c in want]}, i)


@pytest.mark.parametrize("name", ["tiny", "gemma4", "gemma4-window"])
def test_each_visual_token_holds_the_row_hf_scattered(name):
    """`llm.embed` at the image tokens is, in sequence order, the model's own `get_image_features` output; every
    other position the embedding of its token (``<|image>``, ``<image|>`` included)."""
    a = _get(name)
    batch = a.encode(_two(), padding_side="left")
    embeds = collect(a, batch, ["llm.embed"])[Site("llm.embed")]
    with torch.no_grad():
        feats = a.model.model.get_image_features(batch.inputs["pixel_values"], batch.inputs["image_position_ids"]).pooler_output
        table = a.model.get_input_embeddings()(batch.input_ids)
    assert [len(f) for f in feats] == [h * w for h, w in a.image_grids(batch.inputs)]
    visual = batch.roles.visual
    assert torch.equal(visual, batch.input_ids == a.image_token_id)
    torch.testing.assert_close(embeds[visual], torch.cat(feats), atol=1e-6, rtol=0)
    torch.testing.assert_close(embeds[~visual], table[~visual], atol=0, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", ["tiny", "gemma4", "gemma4-window"])
def test_engine_baseline_equals_hf_at_batch_two(name, padding_side):
    """Engine logits == the model's own at every real position (batch 2, both paddings): the tester's per-layer
    inputs, shared key/values and experts; windows of 8 (tiny) and 3 shorter than every prompt."""
    a = _get(name)
    batch = a.encode(_two(), padding_side=padding_side)
    eng = Engine(a)
    valid = ~batch.roles.padding
    windows = [w for w in eng.windows if w is not None]
    if name != "gemma4":
        assert windows and max(windows) < int(valid.sum(1).min())
    with torch.no_grad():
        ref = a.model(**a.model_inputs(batch), position_ids=a.position_ids(batch.inputs)).logits
    torch.testing.assert_close(eng.run(batch).logits()[valid], ref[valid], atol=TOL, rtol=0)


def _routes(a, run) -> list[torch.Tensor]:
    """Each MoE layer's chosen experts for the rows it saw, `[rows, top_k]`, recorded from its router."""
    got = []
    routers = [layer.router for layer in a.model.model.language_model.layers]
    handles = [r.register_forward_hook(lambda m, args, out: got.append(out[2])) for r in routers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("name", ["gemma4", "gemma4-window"])
def test_prune_equals_hf_on_the_shortened_sequence_and_routing_follows(name):
    """Pruning a different number of visual tokens per sample (batch 2) == HF run on each sample's kept rows at their
    original position ids; and every kept token is routed to the experts the hand-cut run routes it to (routing is
    recomputed on the pruned sequence: the engine runs the model's own layers on it)."""
    a = _get(name)
    batch = a.encode(_two(), padding_side="left")
    gen = torch.Generator().manual_seed(0)
    group = batch.roles.visual & (torch.rand(batch.roles.visual.shape, generator=gen) < 0.4)
    assert int(group[0].sum()) != int(group[1].sum()) > 0
    eng = Engine(a)
    keep = ~group & ~batch.roles.padding
    embeds = eng.embed(batch)
    out = None

    def engine_run():
        nonlocal out
        out = eng.run(batch, [Prune(tokens="dead")], groups={"dead": group}.__getitem__)

    ours = _routes(a, engine_run)  # per layer: [batch * packed rows, k]
    width = ours[0].shape[0] // 2
    rows = [keep[b].nonzero().flatten() for b in range(2)]
    for b in range(2):
        refs = []
        theirs = _routes(a, lambda: refs.append(hf_run(a, batch, b, keep[b], embeds)))
        torch.testing.assert_close(out.logits()[b][keep[b]], refs[0].logits[0], atol=TOL, rtol=0)
        n = len(rows[b])
        for layer, (mine, ref) in enumerate(zip(ours, theirs)):
            assert torch.equal(mine[b * width : b * width + n].sort(-1).values, ref.sort(-1).values), (b, layer)
    # and routing depends on the sequence: some kept tokens go to other experts than in the unpruned run
    full = _routes(a, lambda: eng.run(batch))
    fw, moved = full[0].shape[0] // 2, 0
    for b in range(2):
        rank = ((~batch.roles.padding[b]).long().cumsum(0) - 1)[keep[b]]  # each kept token's row in the unpruned run
        for layer in range(1, len(ours)):
            mine = ours[layer][b * width : b * width + len(rows[b])].sort(-1).values
            moved += int((mine != full[layer][b * fw + rank].sort(-1).values).any(-1).sum())
    assert moved > 0


def test_global_layers_do_not_see_the_image_blocks():
    """Gemma 4 makes each image bidirectional on its sliding layers only: an engine that also opened the global
    layers to the image blocks (Gemma 3's rule) would not be the model."""
    a = _get("gemma4")
    batch = a.encode(_two(), padding_side="right")
    valid = ~batch.roles.padding
    ours = Engine(a).run(batch).logits()[valid]
    assert a.has(Capability.SLIDING_BLOCKS_ONLY) and a.block_ids(batch.inputs) is not None
    a.capabilities = a.capabilities - {Capability.SLIDING_BLOCKS_ONLY}
    try:
        gemma3_rule = Engine(a).run(batch).logits()[valid]
    finally:
        del a.capabilities
    assert (ours - gemma3_rule).abs().max() > 1e-3


def test_shared_key_values_bound_where_tokens_may_move():
    """The tester's last two layers reuse the keys and values of layers 0 and 1: FastV at layer 2 would hand them
    keys of tokens no longer there, so it is refused naming the layers; pruning before layer 0 runs (above), and
    decoding from the engine's cache is refused."""
    a = _get("gemma4")
    batch = a.encode(_two(), padding_side="left")
    eng = Engine(a)
    assert eng.kv_store == 0
    with pytest.raises(InterventionError, match=r"at decoder layer 2, after layer 0, whose keys and values the last 2 layers"):
        eng.run(batch, [FastV(layer=2, keep=0.5)])
    with pytest.raises(InterventionError, match=r"decoding from the engine's cache is not supported .*num_kv_shared_layers=2"):
        eng.run(batch, cache=True)


def test_patch_rows_follow_the_image(adapter):
    """Perturb one patch of the image (a 32 x 48 image the processor resizes to whole 8-px blocks): exactly one row of
    ``vision.embed`` changes, the patch's row-major place in the packed sequence, and it is one of the patches of the
    token the role map puts at (row // 2, col // 2)."""
    base = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)
    from PIL import Image

    enc = lambda arr: adapter.encode([Sample([Image.fromarray(arr)], question="what is it?", id="s")])  # noqa: E731
    ref = enc(base)
    pos = ref.inputs["image_position_ids"][0]
    ph, pw = int(pos[:, 1].max()) + 1, int(pos[:, 0].max()) + 1
    ip = adapter.processor.image_processor
    p = int(ip.patch_size)
    vt = ref.roles.visual_tokens()
    emb0 = collect(adapter, ref, ["vision.embed"])[Site("vision.embed")]
    for pr, pc in ((0, 0), (1, 2), (ph - 1, pw - 1), (3, 5)):
        pv = ref.inputs["pixel_values"].clone()
        pv[0, pr * pw + pc] += 0.5  # the patch at (pr, pc) of the resized image
        ref.inputs["pixel_values"], saved = pv, ref.inputs["pixel_values"]
        try:
            emb = collect(adapter, ref, ["vision.embed"])[Site("vision.embed")]
        finally:
            ref.inputs["pixel_values"] = saved
        rows = (emb - emb0).abs().amax(-1).nonzero().tolist()
        assert rows == [[0, pr * pw + pc]], (pr, pc, rows)
        token = ((vt["row"] == pr // 2) & (vt["col"] == pc // 2)).nonzero().flatten()
        assert pr * pw + pc in adapter.patch_indices(vt["feature_col"][token], ref.inputs)[0].tolist()
    # and the processor lays the image's pixels out that way: its patch (pr, pc) holds pixels of that place
    img = adapter.display_pixels(ref.inputs, 0, 0)
    assert img.shape == (3, ph * p, pw * p)


def test_experts_site_is_what_each_router_chose(adapter):
    """``llm.layers[i].experts``: each token's top-k experts, `[batch, seq, k]`, equal to the top-k of the routing
    probabilities each router computes in the model's own forward (at the visual tokens as at any other); a family
    without experts refuses the site."""
    batch = adapter.encode(_two(), padding_side="left")
    n, k = adapter.n_llm_layers, adapter.config.get_text_config().top_k_experts
    acts = collect(adapter, batch, [f"llm.layers[{i}].experts" for i in range(n)])
    probs = []
    routers = [layer.router for layer in adapter.model.model.language_model.layers]
    handles = [r.register_forward_hook(lambda m, a, o: probs.append(o[0])) for r in routers]
    try:
        with torch.no_grad():
            adapter.model(**adapter.model_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    bsz, seq = batch.input_ids.shape
    for i in range(n):
        got = acts[Site("llm.layers", i, "experts")]
        assert got.shape == (bsz, seq, k) and got.dtype == torch.long
        want = probs[i].topk(k, dim=-1).indices.reshape(bsz, seq, k)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    vis = batch.roles.visual
    assert acts[Site("llm.layers", 0, "experts")][vis].shape == (int(vis.sum()), k)  # each visual token's experts
    with pytest.raises(AdapterError, match=r"llm.layers\[0\].experts: llava has no mixture-of-experts router"):
        get_adapter("llava-clip").resolve("llm.layers[0].experts")
